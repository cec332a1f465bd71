/**
 * POST /worker/transcript/snapshot answers byte for byte: status line, every header but Date (names,
 * values and order) and body, for each of the route's cases. The expectations were recorded from the
 * route as an effect/http-api endpoint (main at 36ce75f), before it became a plain router route, so
 * they pin that the change altered no answer. Snapshot ids vary and are written `<id>`.
 */
import { request as httpRequest } from "node:http"
import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { WorkerTokens } from "../../src/ownership/WorkerTokens.ts"
import { maxSnapshotBytes } from "../../src/snapshots/TranscriptSnapshots.ts"
import { maxUploadBodyBytes } from "../../src/http/snapshotUpload.ts"
import { forgeToken, runWithToken, type Scope, TestServer, testServerLayer } from "../support/httpHarness.ts"

const path = "/worker/transcript/snapshot"

interface Sent {
  readonly headers?: Record<string, string>
  readonly body?: string | Buffer
}

/** One request on a connection of its own; the answer as text, Date left out, ids as `<id>`. */
const exchange = (port: number, sent: Sent): Promise<string> =>
  new Promise((resolve, reject) => {
    const req = httpRequest(
      { host: "127.0.0.1", port, path, method: "POST", agent: false, headers: sent.headers ?? {} },
      (res) => {
        const chunks: Array<Buffer> = []
        res.on("data", (chunk: Buffer) => chunks.push(chunk))
        res.on("end", () => {
          const lines = [`${res.statusCode} ${res.statusMessage}`]
          for (let i = 0; i < res.rawHeaders.length; i += 2) {
            if (res.rawHeaders[i]!.toLowerCase() === "date") continue
            lines.push(`${res.rawHeaders[i]}: ${res.rawHeaders[i + 1]}`)
          }
          lines.push("", Buffer.concat(chunks).toString("utf8"))
          const answer = lines.join("\n")
          resolve(/"id":\d+/.test(answer) ? answer.replace(/"id":\d+/, "\"id\":<id>").replace(/content-length: \d+/, "content-length: <n>") : answer)
        })
      }
    )
    req.on("error", reject)
    req.end(sent.body)
  })

/** A JSON body (a string is sent as is) with its length; `token` as a bearer, or a whole Authorization. */
const json = (token: string | { readonly authorization: string } | undefined, body: unknown): Sent => {
  const text = typeof body === "string" ? body : JSON.stringify(body)
  const authorization = token === undefined ? {} : typeof token === "string" ? { authorization: `Bearer ${token}` } : token
  return {
    headers: { ...authorization, "content-type": "application/json", "content-length": String(Buffer.byteLength(text)) },
    body: text
  }
}

/** Recorded from the http-api endpoint (main at 36ce75f). */
const recorded: ReadonlyArray<readonly [string, string]> = [
  ["no token", "401 Unauthorized\ncontent-type: application/json\ncontent-length: 25\nConnection: close\n\n{\"error\":\"Invalid token\"}"],
  ["a token that does not verify", "401 Unauthorized\ncontent-type: application/json\ncontent-length: 25\nConnection: close\n\n{\"error\":\"Invalid token\"}"],
  ["a Basic authorization", "401 Unauthorized\ncontent-type: application/json\ncontent-length: 25\nConnection: close\n\n{\"error\":\"Invalid token\"}"],
  ["an empty bearer", "401 Unauthorized\ncontent-type: application/json\ncontent-length: 25\nConnection: close\n\n{\"error\":\"Invalid token\"}"],
  ["the bearer scheme in lower case, spaces before the token", "400 Bad Request\ncontent-type: application/json\ncontent-length: 57\nConnection: close\n\n{\"error\":\"Missing snapshotJsonl\",\"field\":\"snapshotJsonl\"}"],
  ["a token without a scope claim", "400 Bad Request\ncontent-type: application/json\ncontent-length: 40\nConnection: close\n\n{\"error\":\"Token missing required scope\"}"],
  ["a declared body over the limit", "413 Payload Too Large\ncontent-type: application/json\ncontent-length: 57\nconnection: close\n\n{\"error\":\"Request body over the limit of 25231360 bytes\"}"],
  ["a body that is not UTF-8", "400 Bad Request\ncontent-type: application/json\ncontent-length: 47\nConnection: close\n\n{\"error\":\"The request body is not valid UTF-8\"}"],
  ["not JSON", "400 Bad Request\ncontent-type: application/json\ncontent-length: 29\nConnection: close\n\n{\"error\":\"Invalid JSON body\"}"],
  ["an empty body", "400 Bad Request\ncontent-type: application/json\ncontent-length: 29\nConnection: close\n\n{\"error\":\"Invalid JSON body\"}"],
  ["a JSON array", "400 Bad Request\ncontent-type: application/json\ncontent-length: 42\nConnection: close\n\n{\"error\":\"The body must be a JSON object\"}"],
  ["a JSON string", "400 Bad Request\ncontent-type: application/json\ncontent-length: 42\nConnection: close\n\n{\"error\":\"The body must be a JSON object\"}"],
  ["null", "400 Bad Request\ncontent-type: application/json\ncontent-length: 42\nConnection: close\n\n{\"error\":\"The body must be a JSON object\"}"],
  ["a bad terminal status", "400 Bad Request\ncontent-type: application/json\ncontent-length: 59\nConnection: close\n\n{\"error\":\"Invalid terminalStatus\",\"field\":\"terminalStatus\"}"],
  ["an empty snapshot", "400 Bad Request\ncontent-type: application/json\ncontent-length: 57\nConnection: close\n\n{\"error\":\"Missing snapshotJsonl\",\"field\":\"snapshotJsonl\"}"],
  ["a snapshot that is not a string", "400 Bad Request\ncontent-type: application/json\ncontent-length: 57\nConnection: close\n\n{\"error\":\"Missing snapshotJsonl\",\"field\":\"snapshotJsonl\"}"],
  ["a snapshot over 4 MiB", "413 Payload Too Large\ncontent-type: application/json\ncontent-length: 54\nConnection: close\n\n{\"error\":\"Snapshot too large\",\"field\":\"snapshotJsonl\"}"],
  ["a snapshot with U+0000", "400 Bad Request\ncontent-type: application/json\ncontent-length: 114\nConnection: close\n\n{\"error\":\"contains U+0000 or a lone UTF-16 surrogate, which PostgreSQL text cannot store\",\"field\":\"snapshotJsonl\"}"],
  ["a snapshot with a lone surrogate", "400 Bad Request\ncontent-type: application/json\ncontent-length: 114\nConnection: close\n\n{\"error\":\"contains U+0000 or a lone UTF-16 surrogate, which PostgreSQL text cannot store\",\"field\":\"snapshotJsonl\"}"],
  ["a run id as a string", "400 Bad Request\ncontent-type: application/json\ncontent-length: 52\nConnection: close\n\n{\"error\":\"Missing or invalid runId\",\"field\":\"runId\"}"],
  ["a run id that is a float", "400 Bad Request\ncontent-type: application/json\ncontent-length: 52\nConnection: close\n\n{\"error\":\"Missing or invalid runId\",\"field\":\"runId\"}"],
  ["the body's run is not the token's", "403 Forbidden\ncontent-type: application/json\ncontent-length: 30\nConnection: close\n\n{\"error\":\"runId out of scope\"}"],
  ["a deployment token", "403 Forbidden\ncontent-type: application/json\ncontent-length: 30\nConnection: close\n\n{\"error\":\"runId out of scope\"}"],
  ["a run token for a run of another conversation", "403 Forbidden\ncontent-type: application/json\ncontent-length: 30\nConnection: close\n\n{\"error\":\"runId out of scope\"}"],
  ["stored", "200 OK\ncontent-type: application/json\ncontent-length: <n>\nConnection: close\n\n{\"id\":<id>}"],
  ["stored already", "409 Conflict\ncontent-type: application/json\ncontent-length: 43\nConnection: close\n\n{\"error\":\"Snapshot already exists for run\"}"],
  ["a legacy run of another conversation", "403 Forbidden\ncontent-type: application/json\ncontent-length: 30\nConnection: close\n\n{\"error\":\"runId out of scope\"}"],
  ["a legacy run stored", "200 OK\ncontent-type: application/json\ncontent-length: <n>\nConnection: close\n\n{\"id\":<id>}"],
  ["a legacy run stored already", "409 Conflict\ncontent-type: application/json\ncontent-length: 43\nConnection: close\n\n{\"error\":\"Snapshot already exists for run\"}"],
  ["stored, sent chunked", "200 OK\ncontent-type: application/json\ncontent-length: <n>\nConnection: close\n\n{\"id\":<id>}"],
  ["a database failure", "500 Internal Server Error\ncontent-type: application/json\ncontent-length: 26\nConnection: close\n\n{\"error\":\"Internal error\"}"]
]

const scopeOf = (conversationId: string): Scope => ({ organizationId: "org-answers", agentId: "agent", conversationId })

layer(testServerLayer(), { excludeTestServices: true })("upload answers", (it) => {
  it.effect("every case of POST /worker/transcript/snapshot answers as recorded", () =>
    Effect.gen(function*() {
      const { port } = yield* TestServer
      const tokens = yield* WorkerTokens
      const scope = scopeOf("c-answers")
      const mine = yield* runWithToken(scope)
      const other = yield* runWithToken(scopeOf("c-answers-other"))
      const valid = { runId: mine.runId, terminalStatus: "completed", snapshotJsonl: "x\n" }
      const deployment = yield* tokens.mintDeploymentToken(scope)
      const noScope = yield* forgeToken({ org: scope.organizationId, agent: scope.agentId, run: mine.runId })
      const crossed = yield* tokens.mintRunToken(scope, other.runId)
      const chunked = yield* runWithToken(scope)
      const { sql } = yield* Database
      // A legacy run (no agent or conversation columns): stored through RunOwnership and `put`.
      const [legacyRow] = yield* Effect.promise(() =>
        sql<Array<{ id: string }>>`
          insert into runs (organization_id, queue, action_input)
          values (${scope.organizationId}, 'messages',
                  ${JSON.stringify({ agentId: scope.agentId, conversationId: scope.conversationId })}::jsonb)
          returning id::text`)
      const legacyRunId = Number(legacyRow!.id)
      const legacy = yield* tokens.mintRunToken(scope, legacyRunId)
      const stranger = yield* tokens.mintRunToken(scopeOf("c-answers-stranger"), legacyRunId)

      const cases: ReadonlyArray<readonly [string, Sent]> = [
        ["no token", json(undefined, valid)],
        ["a token that does not verify", json("not-a-jwt", valid)],
        ["a Basic authorization", json({ authorization: "Basic dXNlcjpwYXNz" }, valid)],
        ["an empty bearer", json({ authorization: "Bearer " }, valid)],
        ["the bearer scheme in lower case, spaces before the token", json({ authorization: `bearer   ${mine.token}` }, { ...valid, snapshotJsonl: "" })],
        ["a token without a scope claim", json(noScope, valid)],
        ["a declared body over the limit", {
          headers: { authorization: `Bearer ${mine.token}`, "content-length": String(maxUploadBodyBytes + 1) }
        }],
        ["a body that is not UTF-8", { headers: { authorization: `Bearer ${mine.token}`, "content-length": "3" }, body: Buffer.from([0x7b, 0xff, 0x7d]) }],
        ["not JSON", json(mine.token, "{not json")],
        ["an empty body", json(mine.token, "")],
        ["a JSON array", json(mine.token, [valid])],
        ["a JSON string", json(mine.token, "\"x\"")],
        ["null", json(mine.token, "null")],
        ["a bad terminal status", json(mine.token, { ...valid, terminalStatus: "done" })],
        ["an empty snapshot", json(mine.token, { ...valid, snapshotJsonl: "" })],
        ["a snapshot that is not a string", json(mine.token, { ...valid, snapshotJsonl: ["x"] })],
        ["a snapshot over 4 MiB", json(mine.token, { ...valid, snapshotJsonl: "é".repeat(maxSnapshotBytes / 2 + 1) })],
        ["a snapshot with U+0000", json(mine.token, { ...valid, snapshotJsonl: "a\u0000b\n" })],
        ["a snapshot with a lone surrogate", json(mine.token, "{\"runId\":" + mine.runId + ",\"terminalStatus\":\"completed\",\"snapshotJsonl\":\"a\\ud800b\"}")],
        ["a run id as a string", json(mine.token, { ...valid, runId: String(mine.runId) })],
        ["a run id that is a float", json(mine.token, { ...valid, runId: mine.runId + 0.5 })],
        ["the body's run is not the token's", json(mine.token, { ...valid, runId: other.runId })],
        ["a deployment token", json(deployment, valid)],
        ["a run token for a run of another conversation", json(crossed, { ...valid, runId: other.runId })],
        ["stored", json(mine.token, valid)],
        ["stored already", json(mine.token, valid)],
        ["a legacy run of another conversation", json(stranger, { ...valid, runId: legacyRunId })],
        ["a legacy run stored", json(legacy, { ...valid, runId: legacyRunId })],
        ["a legacy run stored already", json(legacy, { ...valid, runId: legacyRunId })],
        ["stored, sent chunked", {
          headers: { authorization: `Bearer ${chunked.token}`, "transfer-encoding": "chunked" },
          body: JSON.stringify({ ...valid, runId: chunked.runId })
        }]
      ]
      const answers: Array<readonly [string, string]> = []
      for (const [name, sent] of cases) answers.push([name, yield* Effect.promise(() => exchange(port, sent))])
      const failing = yield* runWithToken(scope)
      // A database failure: the table disappears under the running service (renamed back afterwards).
      const failed = yield* Effect.acquireRelease(
        Effect.promise(() => sql`alter table agent_transcript_snapshots rename to agent_transcript_snapshots_away`),
        () => Effect.promise(() => sql`alter table agent_transcript_snapshots_away rename to agent_transcript_snapshots`)
      ).pipe(
        Effect.andThen(Effect.promise(() => exchange(port, json(failing.token, { ...valid, runId: failing.runId })))),
        Effect.scoped
      )
      answers.push(["a database failure", failed])
      assert.deepStrictEqual(answers.map(([name]) => name), recorded.map(([name]) => name))
      for (let i = 0; i < recorded.length; i++) assert.strictEqual(answers[i]![1], recorded[i]![1], recorded[i]![0])
    }))
})
