import { connect } from "node:net"
import { assert, describe, layer } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import { maxEnqueueBodyBytes } from "../../src/http/adminHandlers.ts"
import { maxUploadBodyBytes } from "../../src/http/snapshotUpload.ts"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { WorkerTokens } from "../../src/ownership/WorkerTokens.ts"
import { adminToken, call, runWithToken, TestServer, testServerLayer } from "../support/httpHarness.ts"
import { eventually } from "../support/lockHarness.ts"

const admin = { token: adminToken }

/** Writes the request head, then body chunks one at a time until the server answers (or all are sent). */
const sendSlowly = (
  port: number,
  head: string,
  chunk: Buffer,
  maxChunks: number
): Promise<{ readonly response: string; readonly chunksSent: number }> =>
  new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1")
    let response = ""
    let chunksSent = 0
    let answered = false
    socket.on("error", (error: NodeJS.ErrnoException) => {
      // The server may cut the connection once it has answered; what it answered is what counts.
      if (answered) return
      reject(error)
    })
    socket.on("data", (data) => {
      response += data.toString("latin1")
      if (!answered && response.includes("\r\n\r\n")) {
        answered = true
        setImmediate(() => {
          socket.destroy()
          resolve({ response, chunksSent })
        })
      }
    })
    const writeNext = () => {
      if (answered || socket.destroyed) return
      if (chunksSent >= maxChunks) return
      chunksSent++
      socket.write(chunk, () => setTimeout(writeNext, 5))
    }
    socket.write(head, () => writeNext())
  })

layer(testServerLayer(), { excludeTestServices: true })("the HTTP service", (it) => {
  it.effect("health, readiness and the orchestrator's lock usage", () =>
    Effect.gen(function*() {
      assert.deepStrictEqual((yield* call("GET", "/health")).json, { status: "ok" })
      const ready = yield* call("GET", "/health/ready")
      assert.strictEqual(ready.status, 200)
      assert.deepInclude(ready.json as object, { status: "ready" })
      const locks = yield* ConversationLocks
      const scope = yield* Scope.make()
      yield* locks.acquire({ organizationId: "o", agentId: "a", conversationId: "health" }).pipe(Scope.provide(scope))
      const usage = (yield* call("GET", "/health/orchestrator")).json as Record<string, unknown>
      assert.deepInclude(usage, {
        status: "ok",
        reserved_conversation_locks: 1,
        reserved_conversation_locks_cap: 3,
        near_cap: false,
        held: 1,
        stranded: 0,
        held_in_database_by_this_process: 1
      })
      assert.isAtLeast(usage["held_in_database"] as number, 1)
      yield* Scope.close(scope, Exit.void)
      const after = (yield* call("GET", "/health/orchestrator")).json as Record<string, unknown>
      assert.deepInclude(after, { reserved_conversation_locks: 0, acquired_total: 1, held_in_database_by_this_process: 0 })
    }))

  it.effect("/metrics: lock gauges and counters, run counts by queue and status, HTTP counts and latencies", () =>
    Effect.gen(function*() {
      yield* call("POST", "/v1/runs", { ...admin, body: { queue: "metrics-q", organizationId: "o", payload: {} } })
      yield* call("GET", "/health")
      // Refusals are counted under their own status, and unknown paths under one "unmatched" route.
      assert.strictEqual((yield* call("POST", "/worker/transcript/snapshot", { token: "not-a-token", body: {} })).status, 401)
      assert.strictEqual((yield* call("GET", "/no/such/path/4711")).status, 404)
      const metrics = yield* call("GET", "/metrics")
      assert.strictEqual(metrics.status, 200)
      assert.match(metrics.contentType ?? "", /^text\/plain; version=0\.0\.4/)
      for (
        const line of [
          /^runlane_conversation_locks_reserved 0$/m,
          /^runlane_conversation_locks_cap 3$/m,
          /^runlane_conversation_locks_stranded 0$/m,
          /^# TYPE runlane_conversation_locks_acquired_total counter$/m,
          /^runlane_runs\{queue="metrics-q",status="pending"\} 1$/m,
          /^runlane_http_requests_total\{method="GET",route="\/health",status="200"\} [1-9]/m,
          /^runlane_http_request_duration_seconds_bucket\{method="GET",route="\/health",le="\+Inf"\} [1-9]/m,
          /^runlane_http_requests_total\{method="POST",route="\/worker\/transcript\/snapshot",status="401"\} [1-9]/m,
          /^runlane_http_requests_total\{method="GET",route="unmatched",status="404"\} [1-9]/m
        ]
      ) assert.match(metrics.text, line)
    }))

  it.effect("GET /v1/runs/{id} tells where a run is; POST /v1/runs/{id}/cancel cancels a pending one; both are admin routes", () =>
    Effect.gen(function*() {
      const created = yield* call("POST", "/v1/runs", { ...admin, body: { queue: "state-q", organizationId: "o", payload: {} } })
      const id = (created.json as { id: number }).id
      const state = yield* call("GET", `/v1/runs/${id}`, admin)
      assert.strictEqual(state.status, 200)
      assert.deepInclude(state.json as object, { id, queue: "state-q", status: "pending", attempts: 0, max_attempts: 3, error: null, claimed_by: null })
      assert.isFalse(Number.isNaN(Date.parse((state.json as { run_at: string }).run_at)))
      const cancelled = yield* call("POST", `/v1/runs/${id}/cancel`, admin)
      assert.deepStrictEqual(cancelled.json, { outcome: "cancelled", status: "cancelled" })
      assert.deepStrictEqual((yield* call("POST", `/v1/runs/${id}/cancel`, admin)).json, { outcome: "already_final", status: "cancelled" })
      assert.strictEqual(((yield* call("GET", `/v1/runs/${id}`, admin)).json as { status: string }).status, "cancelled")
      assert.strictEqual((yield* call("GET", "/v1/runs/999999999", admin)).status, 404)
      assert.strictEqual((yield* call("POST", "/v1/runs/999999999/cancel", admin)).status, 404)
      assert.strictEqual((yield* call("GET", "/v1/runs/abc", admin)).status, 400)
      assert.strictEqual((yield* call("GET", `/v1/runs/${id}`)).status, 401)
      assert.strictEqual((yield* call("POST", `/v1/runs/${id}/cancel`)).status, 401)
    }))

  it.effect("POST /v1/runs enqueues, dedupes by idempotency key, and names a bad field", () =>
    Effect.gen(function*() {
      const body = { queue: "messages", organizationId: "org", agentId: "a", conversationId: "c", payload: { text: "hi" } }
      const created = yield* call("POST", "/v1/runs", { ...admin, body: { ...body, idempotencyKey: "k1" } })
      assert.strictEqual(created.status, 200)
      const { id } = created.json as { id: number; created: boolean }
      assert.deepStrictEqual(created.json, { id, created: true })
      const again = yield* call("POST", "/v1/runs", { ...admin, body: { ...body, idempotencyKey: "k1" } })
      assert.deepStrictEqual(again.json, { id, created: false })
      const bad: ReadonlyArray<readonly [unknown, string]> = [
        [{ ...body, queue: "" }, "queue"],
        [{ ...body, payload: [1] }, "payload"],
        [{ ...body, payload: "{}" }, "payload"],
        [{ ...body, priority: 1.5 }, "priority"],
        [{ ...body, maxAttempts: 0 }, "maxAttempts"],
        [{ ...body, organizationId: undefined }, "organizationId"],
        [{ ...body, conversationId: "a\u0000b" }, "conversationId"],
        [{ ...body, prioirty: 1 }, "prioirty"]
      ]
      for (const [input, field] of bad) {
        const answer = yield* call("POST", "/v1/runs", { ...admin, body: input })
        assert.strictEqual(answer.status, 400, field)
        assert.strictEqual((answer.json as { field: string }).field, field)
      }
      assert.strictEqual((yield* call("POST", "/v1/runs", { ...admin, rawBody: "nope" })).status, 400)
      const tooBig = yield* call("POST", "/v1/runs", {
        ...admin,
        body: { ...body, payload: { text: "x".repeat(maxEnqueueBodyBytes) } }
      })
      assert.strictEqual(tooBig.status, 413)
    }))

  it.effect("POST /v1/runs refuses an integer beyond 2^53 with a 400 naming its field instead of storing it rounded", () =>
    Effect.gen(function*() {
      const { sql } = yield* Database
      const count = Effect.promise(async () => (await sql<Array<{ n: number }>>`select count(*)::int as n from runs`)[0]!.n)
      const before = yield* count
      for (const [number, field] of [["12345678901234567891", "payload.order.id"], ["-9007199254740993", "payload.order.id"]]) {
        const rawBody = `{"queue":"big","organizationId":"org","payload":{"order":{"id":${number}}}}`
        const answer = yield* call("POST", "/v1/runs", { ...admin, rawBody })
        assert.strictEqual(answer.status, 400, `${number}: ${answer.text}`)
        assert.strictEqual((answer.json as { field: string }).field, field)
        assert.match((answer.json as { error: string }).error, /2\^53/)
      }
      assert.strictEqual(yield* count, before)
      // The largest exact integer and ordinary fractions are stored as sent.
      const exact = yield* call("POST", "/v1/runs", {
        ...admin,
        rawBody: `{"queue":"big","organizationId":"org","payload":{"id":9007199254740991,"ratio":0.1}}`
      })
      assert.strictEqual(exact.status, 200)
      const [stored] = yield* Effect.promise(() =>
        sql<Array<{ text: string }>>`select action_input::text as text from runs where id = ${(exact.json as { id: number }).id}`)
      assert.strictEqual(stored!.text, `{"id": 9007199254740991, "ratio": 0.1}`)
    }))

  it.effect("admin routes need the admin bearer token", () =>
    Effect.gen(function*() {
      const body = { queue: "messages", organizationId: "org", payload: {} }
      for (const token of [undefined, "wrong-token-wrong-token", `${adminToken}x`]) {
        const answer = yield* call("POST", "/v1/runs", { ...(token === undefined ? {} : { token }), body })
        assert.strictEqual(answer.status, 401)
        assert.strictEqual((yield* call("POST", "/v1/runs/1/token", token === undefined ? {} : { token })).status, 401)
      }
    }))

  it.effect("POST /v1/runs/{id}/token mints a run token that uploads for that run only", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const scope = { organizationId: "org", agentId: "a", conversationId: "c-token" }
      const { runId } = yield* runWithToken(scope)
      const minted = yield* call("POST", `/v1/runs/${runId}/token`, admin)
      assert.strictEqual(minted.status, 200)
      const token = (minted.json as { token: string }).token
      const verified = yield* tokens.verify(token)
      assert.deepStrictEqual({ kind: verified.kind, runId: verified.runId, scope: verified.scope }, { kind: "run", runId, scope })
      const upload = yield* call("POST", "/worker/transcript/snapshot", {
        token,
        body: { runId, terminalStatus: "completed", snapshotJsonl: "x\n" }
      })
      assert.strictEqual(upload.status, 200)
      for (const id of ["abc", "1.5", "0", "-1", "1e3", "99999999999999999999"]) {
        const answer = yield* call("POST", `/v1/runs/${id}/token`, admin)
        assert.strictEqual(answer.status, 400, id)
        assert.strictEqual((answer.json as { field: string }).field, "id")
      }
      assert.strictEqual((yield* call("POST", "/v1/runs/987654321/token", admin)).status, 404)
      const noConversation = yield* call("POST", "/v1/runs", { ...admin, body: { queue: "q", organizationId: "o", payload: {} } })
      const orphan = (noConversation.json as { id: number }).id
      assert.strictEqual((yield* call("POST", `/v1/runs/${orphan}/token`, admin)).status, 409)
    }))

  it.effect("a run enqueued without a conversation gets no token, whatever its payload says (409)", () =>
    Effect.gen(function*() {
      const victim = yield* runWithToken({ organizationId: "org", agentId: "agent", conversationId: "conv-victim" })
      const first = yield* call("POST", "/worker/transcript/snapshot", {
        token: victim.token,
        body: { runId: victim.runId, terminalStatus: "completed", snapshotJsonl: "the victim's transcript\n" }
      })
      assert.strictEqual(first.status, 200)
      const sent = yield* call("POST", "/v1/runs", {
        ...admin,
        body: { queue: "q", organizationId: "org", agentId: "agent", payload: { conversationId: "conv-victim" } }
      })
      assert.strictEqual(sent.status, 200)
      const minted = yield* call("POST", `/v1/runs/${(sent.json as { id: number }).id}/token`, admin)
      assert.strictEqual(minted.status, 409)
    }))

  it.effect("an upload over the body limit is refused with 413 before the body is read", () =>
    Effect.gen(function*() {
      const { port } = yield* TestServer
      const { runId, token } = yield* runWithToken({ organizationId: "o", agentId: "a", conversationId: "c-slow" })
      const chunk = Buffer.alloc(256 * 1024, "a")
      // Declared too large: answered at once, before a single body byte.
      const declared = yield* Effect.promise(() =>
        sendSlowly(
          port,
          `POST /worker/transcript/snapshot HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n` +
            `content-type: application/json\r\ncontent-length: ${maxUploadBodyBytes + 1}\r\n\r\n`,
          chunk,
          0
        ))
      assert.match(declared.response, /^HTTP\/1\.1 413 /)
      // Chunked (no length), sent slowly: answered once the limit is passed, long before the sender is done.
      const chunksForLimit = Math.ceil(maxUploadBodyBytes / chunk.length)
      const chunked = yield* Effect.promise(() =>
        sendSlowly(
          port,
          `POST /worker/transcript/snapshot HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n` +
            `content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n`,
          Buffer.concat([Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from("\r\n")]),
          chunksForLimit * 4
        ))
      assert.match(chunked.response, /^HTTP\/1\.1 413 /)
      assert.isBelow(chunked.chunksSent, chunksForLimit * 4)
      assert.strictEqual((yield* call("GET", "/worker/transcript/snapshot", { token })).status, 404)
      assert.isAbove(runId, 0)
    }))

  it.effect("an upload whose client goes away mid-body is counted as 499 (client closed request), not as a server error", () =>
    Effect.gen(function*() {
      const { port } = yield* TestServer
      const { token } = yield* runWithToken({ organizationId: "o", agentId: "a", conversationId: "c-gone" })
      const series = (status: number) =>
        new RegExp(`^runlane_http_requests_total\\{method="POST",route="/worker/transcript/snapshot",status="${status}"\\} (\\d+)$`, "m")
      const count = (text: string, status: number) => Number(series(status).exec(text)?.[1] ?? 0)
      const before = (yield* call("GET", "/metrics")).text
      yield* Effect.promise(() =>
        new Promise<void>((resolve, reject) => {
          const socket = connect(port, "127.0.0.1", () => {
            socket.write(
              `POST /worker/transcript/snapshot HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n` +
                `content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"runId":`,
              () => setTimeout(() => (socket.destroy(), resolve()), 100)
            )
          })
          socket.on("error", reject)
        })
      )
      let after = before
      yield* eventually(
        "the abandoned upload counted",
        Effect.map(call("GET", "/metrics"), (metrics) => {
          after = metrics.text
          return count(after, 499) + count(after, 500) > count(before, 499) + count(before, 500)
        }),
        5_000
      )
      assert.deepStrictEqual(
        { clientClosed: count(after, 499) - count(before, 499), serverError: count(after, 500) - count(before, 500) },
        { clientClosed: 1, serverError: 0 }
      )
    }))

  it.effect("an unknown route is a JSON 404", () =>
    Effect.gen(function*() {
      const answer = yield* call("GET", "/nope")
      assert.strictEqual(answer.status, 404)
      assert.deepStrictEqual(answer.json, { error: "Not found" })
    }))
})

describe("without RUNLANE_ADMIN_TOKEN", () => {
  layer(testServerLayer({ adminToken: null }), { excludeTestServices: true })("admin routes", (it) => {
    it.effect("answer 404, whatever the bearer", () =>
      Effect.gen(function*() {
        const body = { queue: "messages", organizationId: "org", payload: {} }
        assert.strictEqual((yield* call("POST", "/v1/runs", { token: adminToken, body })).status, 404)
        assert.strictEqual((yield* call("POST", "/v1/runs", { body })).status, 404)
        assert.strictEqual((yield* call("POST", "/v1/runs/1/token", { token: adminToken })).status, 404)
        assert.strictEqual((yield* call("GET", "/health")).status, 200)
      }))
  })
})
