import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { WorkerTokens } from "../../src/ownership/WorkerTokens.ts"
import { maxSnapshotBytes } from "../../src/snapshots/TranscriptSnapshots.ts"
import { call, forgeToken, runWithToken, type Scope, testServerLayer, unsignedToken } from "../support/httpHarness.ts"

const path = "/worker/transcript/snapshot"
const scopeOf = (conversationId: string, organizationId = "org-a"): Scope => ({
  organizationId,
  agentId: "agent-x",
  conversationId
})
const claimsOf = (scope: Scope, runId?: number) => ({
  org: scope.organizationId,
  agent: scope.agentId,
  conv: scope.conversationId,
  ...(runId === undefined ? {} : { run: runId })
})
const jsonl = (...lines: ReadonlyArray<unknown>) => lines.map((line) => JSON.stringify(line)).join("\n") + "\n"

const storedFor = (runId: number) =>
  Effect.flatMap(Database, ({ sql }) =>
    Effect.promise(async () => {
      const [row] = await sql<Array<{ n: number }>>`select count(*)::int as n from agent_transcript_snapshots where run_id = ${runId}`
      return row?.n ?? -1
    }))

const upload = (token: string, body: unknown) => call("POST", path, { token, body })

layer(testServerLayer(), { excludeTestServices: true })("snapshot routes over HTTP", (it) => {
  it.effect("POST stores, GET answers the bytes unchanged as NDJSON, a second POST is 409", () =>
    Effect.gen(function*() {
      const scope = scopeOf("c-roundtrip")
      const { runId, token } = yield* runWithToken(scope)
      const snapshot = jsonl({ type: "session" }, { type: "message", text: "héllo 日本 🙂 \"quoted\" \\ back" })
      const first = yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: snapshot })
      assert.strictEqual(first.status, 200)
      assert.isNumber((first.json as { id: number }).id)
      const latest = yield* call("GET", path, { token })
      assert.strictEqual(latest.status, 200)
      assert.strictEqual(latest.contentType, "application/x-ndjson; charset=utf-8")
      assert.strictEqual(latest.text, snapshot)
      const again = yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: "other\n" })
      assert.strictEqual(again.status, 409)
      assert.deepStrictEqual(again.json, { error: "Snapshot already exists for run" })
      assert.strictEqual(yield* storedFor(runId), 1)
    }))

  it.effect("a 600 KB snapshot with multi-byte characters round-trips byte for byte", () =>
    Effect.gen(function*() {
      const scope = scopeOf("c-large")
      const { runId, token } = yield* runWithToken(scope)
      const big = jsonl({ type: "message", text: "ü🙂x\n\t\"".repeat(75_000) })
      assert.isAbove(Buffer.byteLength(big), 600_000)
      assert.strictEqual((yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: big })).status, 200)
      const latest = yield* call("GET", path, { token })
      assert.isTrue(Buffer.from(latest.text, "utf8").equals(Buffer.from(big, "utf8")))
    }))

  it.effect("a snapshot within 4 MiB is accepted however its JSON is escaped: \\uXXXX Cyrillic (3x) and control characters (6x)", () =>
    Effect.gen(function*() {
      // Python's json.dumps default (ensure_ascii) escapes every non-ASCII character as \uXXXX.
      const asciiOnly = (value: unknown) =>
        JSON.stringify(value).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`)
      const cyrillic = jsonl({ type: "message", text: "Привет, мир! ".repeat(150_000) })
      assert.isAbove(Buffer.byteLength(cyrillic), 3 * 1024 * 1024)
      const worst = "\u0001".repeat(maxSnapshotBytes)
      for (const [name, snapshotJsonl] of [["3 MiB of Cyrillic", cyrillic], ["4 MiB of U+0001", worst]] as const) {
        const { runId, token } = yield* runWithToken(scopeOf(`c-escaped-${name.length}`))
        const rawBody = asciiOnly({ runId, terminalStatus: "completed", snapshotJsonl })
        assert.isAbove(Buffer.byteLength(rawBody), 2 * maxSnapshotBytes, name)
        const answer = yield* call("POST", path, { token, rawBody })
        assert.strictEqual(answer.status, 200, `${name}: ${answer.text}`)
        assert.isTrue((yield* call("GET", path, { token })).text === snapshotJsonl, name)
      }
    }))

  it.effect("GET serves the newest completed snapshot, never a newer failed one; 404 when only failed ones exist", () =>
    Effect.gen(function*() {
      const scope = scopeOf("c-newest")
      const first = yield* runWithToken(scope)
      const second = yield* runWithToken(scope)
      const failed = yield* runWithToken(scope)
      yield* upload(first.token, { runId: first.runId, terminalStatus: "completed", snapshotJsonl: "first\n" })
      yield* upload(second.token, { runId: second.runId, terminalStatus: "completed", snapshotJsonl: "second\n" })
      const failedUpload = yield* upload(failed.token, { runId: failed.runId, terminalStatus: "failed", snapshotJsonl: "x\n" })
      assert.strictEqual(failedUpload.status, 200)
      assert.strictEqual((yield* call("GET", path, { token: first.token })).text, "second\n")

      const onlyFailed = scopeOf("c-only-failed")
      const run = yield* runWithToken(onlyFailed)
      yield* upload(run.token, { runId: run.runId, terminalStatus: "timeout", snapshotJsonl: "partial\n" })
      const missing = yield* call("GET", path, { token: run.token })
      assert.strictEqual(missing.status, 404)
      assert.deepStrictEqual(missing.json, { error: "No snapshot found" })
    }))

  it.effect("DELETE resets one conversation only, answers how many, and is idempotent; a deployment token may call it", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const reset = scopeOf("c-reset")
      const kept = scopeOf("c-kept")
      for (const scope of [reset, reset, kept]) {
        const { runId, token } = yield* runWithToken(scope)
        yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: `${scope.conversationId}\n` })
      }
      const deployment = yield* tokens.mintDeploymentToken(reset)
      assert.deepStrictEqual((yield* call("DELETE", path, { token: deployment })).json, { deleted: 2 })
      assert.deepStrictEqual((yield* call("DELETE", path, { token: deployment })).json, { deleted: 0 })
      assert.strictEqual((yield* call("GET", path, { token: deployment })).status, 404)
      const keptToken = yield* tokens.mintDeploymentToken(kept)
      assert.strictEqual((yield* call("GET", path, { token: keptToken })).text, "c-kept\n")
    }))

  it.effect("tenant isolation: organization A never reads, writes or deletes B's snapshots, even with the same agent and conversation ids", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const b = scopeOf("c-shared", "org-b")
      const a = scopeOf("c-shared", "org-a-tenant")
      const runB = yield* runWithToken(b)
      yield* upload(runB.token, { runId: runB.runId, terminalStatus: "completed", snapshotJsonl: "secret of b\n" })
      const aDeployment = yield* tokens.mintDeploymentToken(a)
      assert.strictEqual((yield* call("GET", path, { token: aDeployment })).status, 404)
      assert.deepStrictEqual((yield* call("DELETE", path, { token: aDeployment })).json, { deleted: 0 })
      // A run token naming B's run but A's organization: the run does not belong to that scope.
      const aForB = yield* tokens.mintRunToken(a, runB.runId)
      const forged = yield* upload(aForB, { runId: runB.runId, terminalStatus: "completed", snapshotJsonl: "x\n" })
      assert.strictEqual(forged.status, 403)
      assert.strictEqual((yield* call("GET", path, { token: runB.token })).text, "secret of b\n")
    }))

  it.effect("bad tokens are 401, a token without a scope claim is 400, and nothing is stored", () =>
    Effect.gen(function*() {
      const scope = scopeOf("c-tokens")
      const { runId, token } = yield* runWithToken(scope)
      const body = { runId, terminalStatus: "completed", snapshotJsonl: "x\n" }
      const [header, payload, signature] = token.split(".")
      const tamperedPayload = Buffer.from(
        JSON.stringify({ ...JSON.parse(Buffer.from(payload!, "base64url").toString()), conv: "c-other" })
      ).toString("base64url")
      const flipped = signature!.slice(0, -2) + (signature!.endsWith("AA") ? "BB" : "AA")
      const badTokens = {
        none: undefined,
        garbage: "not-a-jwt",
        "tampered payload": `${header}.${tamperedPayload}.${signature}`,
        "tampered signature": `${header}.${payload}.${flipped}`,
        "alg none": unsignedToken(claimsOf(scope, runId)),
        expired: yield* forgeToken(claimsOf(scope, runId), { expiresIn: -120 }),
        "from the future": yield* forgeToken(claimsOf(scope, runId), { notBefore: Math.floor(Date.now() / 1000) + 3600 }),
        "HS512 instead of HS256": yield* forgeToken(claimsOf(scope, runId), { alg: "HS512" }),
        "no token id": yield* forgeToken({ ...claimsOf(scope, runId), jti: undefined })
      }
      for (const [name, bad] of Object.entries(badTokens)) {
        for (const method of ["POST", "GET", "DELETE"]) {
          const answer = yield* call(method, path, { ...(bad === undefined ? {} : { token: bad }), body })
          assert.strictEqual(answer.status, 401, `${name} on ${method}`)
          assert.deepStrictEqual(answer.json, { error: "Invalid token" }, name)
        }
      }
      for (const missing of ["org", "agent", "conv"]) {
        const noScope = yield* forgeToken({ ...claimsOf(scope, runId), [missing]: undefined })
        const answer = yield* upload(noScope, body)
        assert.strictEqual(answer.status, 400, missing)
        assert.deepStrictEqual(answer.json, { error: "Token missing required scope" })
        assert.strictEqual((yield* call("GET", path, { token: noScope })).status, 400)
      }
      assert.strictEqual(yield* storedFor(runId), 0)
    }))

  it.effect("bad bodies are 400 naming the field, over-limit snapshots 413, and nothing is stored", () =>
    Effect.gen(function*() {
      const scope = scopeOf("c-bodies")
      const { runId, token } = yield* runWithToken(scope)
      const valid = { runId, terminalStatus: "completed", snapshotJsonl: "x\n" }
      const cases: ReadonlyArray<readonly [string, { readonly body?: unknown; readonly rawBody?: string }, number, string]> = [
        ["not JSON", { rawBody: "{not json" }, 400, "Invalid JSON body"],
        ["empty body", { rawBody: "" }, 400, "Invalid JSON body"],
        ["a JSON array", { body: [valid] }, 400, "The body must be a JSON object"],
        ["bad terminal status", { body: { ...valid, terminalStatus: "done" } }, 400, "Invalid terminalStatus"],
        ["missing terminal status", { body: { ...valid, terminalStatus: undefined } }, 400, "Invalid terminalStatus"],
        ["empty snapshot", { body: { ...valid, snapshotJsonl: "" } }, 400, "Missing snapshotJsonl"],
        ["missing snapshot", { body: { ...valid, snapshotJsonl: undefined } }, 400, "Missing snapshotJsonl"],
        ["snapshot not a string", { body: { ...valid, snapshotJsonl: ["x"] } }, 400, "Missing snapshotJsonl"],
        ["run id as a string", { body: { ...valid, runId: String(runId) } }, 400, "Missing or invalid runId"],
        ["run id a float", { body: { ...valid, runId: runId + 0.5 } }, 400, "Missing or invalid runId"],
        ["run id zero", { body: { ...valid, runId: 0 } }, 400, "Missing or invalid runId"],
        ["run id negative", { body: { ...valid, runId: -runId } }, 400, "Missing or invalid runId"],
        ["missing run id", { body: { ...valid, runId: undefined } }, 400, "Missing or invalid runId"],
        ["snapshot over 4 MiB of UTF-8", { body: { ...valid, snapshotJsonl: "é".repeat(maxSnapshotBytes / 2 + 1) } }, 413, "Snapshot too large"]
      ]
      for (const [name, request, status, error] of cases) {
        const answer = yield* call("POST", path, { token, ...request })
        assert.strictEqual(answer.status, status, name)
        assert.strictEqual((answer.json as { error: string }).error, error, name)
      }
      const nul = yield* upload(token, { ...valid, snapshotJsonl: "a\u0000b\n" })
      assert.strictEqual(nul.status, 400)
      assert.strictEqual((nul.json as { field: string }).field, "snapshotJsonl")
      assert.match((nul.json as { error: string }).error, /U\+0000/)
      assert.strictEqual(yield* storedFor(runId), 0)
      // Exactly at the limit is accepted.
      const atLimit = yield* upload(token, { ...valid, snapshotJsonl: "é".repeat(maxSnapshotBytes / 2) })
      assert.strictEqual(atLimit.status, 200)
    }))

  it.effect("403 when the token's run differs from the body's, for a deployment token, and for a run of another conversation", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const scope = scopeOf("c-forbidden")
      const mine = yield* runWithToken(scope)
      const other = yield* runWithToken(scopeOf("c-elsewhere"))
      const body = (runId: number) => ({ runId, terminalStatus: "completed", snapshotJsonl: "x\n" })
      const mismatch = yield* upload(mine.token, body(other.runId))
      assert.strictEqual(mismatch.status, 403)
      assert.deepStrictEqual(mismatch.json, { error: "runId out of scope" })
      const deployment = yield* tokens.mintDeploymentToken(scope)
      assert.strictEqual((yield* upload(deployment, body(mine.runId))).status, 403)
      // Properly signed for this conversation, but naming a run of another one.
      const crossed = yield* tokens.mintRunToken(scope, other.runId)
      assert.strictEqual((yield* upload(crossed, body(other.runId))).status, 403)
      const missingRun = yield* tokens.mintRunToken(scope, 987_654_321)
      assert.strictEqual((yield* upload(missingRun, body(987_654_321))).status, 403)
      assert.strictEqual(yield* storedFor(mine.runId), 0)
      assert.strictEqual(yield* storedFor(other.runId), 0)
    }))

  it.effect("a legacy run without scope columns is owned through its action_input object (a JSON-string row cannot exist here)", () =>
    Effect.gen(function*() {
      const { sql } = yield* Database
      const tokens = yield* WorkerTokens
      const scope = scopeOf("c-legacy")
      const payload = { agentId: scope.agentId, conversationId: scope.conversationId }
      const rows = yield* Effect.promise(() =>
        sql<Array<{ id: string }>>`
          insert into runs (organization_id, queue, action_input)
          values (${scope.organizationId}, 'messages', ${JSON.stringify(payload)}::jsonb),
                 (${scope.organizationId}, 'messages', to_jsonb(${JSON.stringify(payload)}::text))
          returning id::text`
      ).pipe(Effect.catchDefect(() => Effect.succeed([] as Array<{ id: string }>)))
      assert.strictEqual(rows.length, 0, "the jsonb object CHECK refuses a JSON string row")
      const [legacy] = yield* Effect.promise(() =>
        sql<Array<{ id: string }>>`
          insert into runs (organization_id, queue, action_input)
          values (${scope.organizationId}, 'messages', ${JSON.stringify(payload)}::jsonb) returning id::text`)
      const runId = Number(legacy!.id)
      const token = yield* tokens.mintRunToken(scope, runId)
      const first = yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: "legacy\n" })
      assert.strictEqual(first.status, 200)
      assert.strictEqual((yield* upload(token, { runId, terminalStatus: "completed", snapshotJsonl: "again\n" })).status, 409)
      const stranger = yield* tokens.mintRunToken(scopeOf("c-not-legacy"), runId)
      assert.strictEqual((yield* upload(stranger, { runId, terminalStatus: "completed", snapshotJsonl: "x\n" })).status, 403)
      assert.strictEqual(yield* storedFor(runId), 1)
    }))

  it.effect("two concurrent POSTs for one run: exactly one 200 and one 409, one row", () =>
    Effect.gen(function*() {
      for (let round = 0; round < 5; round++) {
        const { runId, token } = yield* runWithToken(scopeOf(`c-race-${round}`))
        const answers = yield* Effect.all(
          ["first\n", "second\n"].map((snapshotJsonl) => upload(token, { runId, terminalStatus: "completed", snapshotJsonl })),
          { concurrency: "unbounded" }
        )
        assert.deepStrictEqual(answers.map((a) => a.status).sort(), [200, 409])
        assert.strictEqual(yield* storedFor(runId), 1)
      }
    }))

  it.effect("a database failure is a 500 with a generic body", () =>
    Effect.gen(function*() {
      const { sql } = yield* Database
      const scope = scopeOf("c-db-failure")
      const { runId, token } = yield* runWithToken(scope)
      // The fault: the table disappears under the running service (renamed back afterwards).
      yield* Effect.acquireRelease(
        Effect.promise(() => sql`alter table agent_transcript_snapshots rename to agent_transcript_snapshots_away`),
        () => Effect.promise(() => sql`alter table agent_transcript_snapshots_away rename to agent_transcript_snapshots`)
      )
      for (const method of ["POST", "GET", "DELETE"]) {
        const answer = yield* call(method, path, { token, body: { runId, terminalStatus: "completed", snapshotJsonl: "x\n" } })
        assert.strictEqual(answer.status, 500, method)
        assert.deepStrictEqual(answer.json, { error: "Internal error" })
      }
    }).pipe(Effect.scoped))
})
