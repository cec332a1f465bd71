import { assert, describe, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { Database } from "../../src/db/Database.ts"
import { InvalidRunInput, type SendRunInput } from "../../src/runs/runInput.ts"
import { RunsQueue, runsChannel } from "../../src/runs/RunsQueue.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = RunsQueue.layer.pipe(Layer.provideMerge(testDatabaseLayer()))

const base: SendRunInput = {
  queue: "messages",
  organizationId: "org-1",
  agentId: "agent-1",
  conversationId: "telegram:6570514069",
  payload: { text: "hello", n: 1 }
}

interface StoredRun {
  readonly id: string
  readonly organization_id: string
  readonly agent_id: string | null
  readonly conversation_id: string | null
  readonly queue: string
  readonly status: string
  readonly action_input: unknown
  readonly input_type: string
  readonly priority: number
  readonly max_attempts: number
  readonly retry_delay_seconds: number | null
  readonly idempotency_key: string | null
  readonly delay_ms: number
  readonly expires_at: string | null
}

const readRun = (id: number) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const rows = yield* use("test.readRun", (sql) =>
      sql<Array<StoredRun>>`
        select id::text, organization_id, agent_id, conversation_id, queue, status, action_input,
               jsonb_typeof(action_input) as input_type, priority, max_attempts, retry_delay_seconds,
               idempotency_key, extract(epoch from (run_at - created_at)) * 1000 as delay_ms,
               expires_at::text
          from runs where id = ${id}`)
    return rows[0]
  })

const countRuns = Effect.gen(function*() {
  const { use } = yield* Database
  const [row] = yield* use("test.countRuns", (sql) => sql<Array<{ n: number }>>`select count(*)::int as n from runs`)
  return row!.n
})

layer(TestLayer, { excludeTestServices: true })("RunsQueue.send", (it) => {
  it.effect("writes the scope columns and stores the payload as a jsonb object", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const result = yield* queue.send(base)
      assert.isTrue(result.created)
      const row = yield* readRun(result.id)
      assert.strictEqual(row?.organization_id, "org-1")
      assert.strictEqual(row?.agent_id, "agent-1")
      assert.strictEqual(row?.conversation_id, "telegram:6570514069")
      assert.strictEqual(row?.queue, "messages")
      assert.strictEqual(row?.status, "pending")
      assert.strictEqual(row?.input_type, "object")
      assert.deepStrictEqual(row?.action_input, { text: "hello", n: 1 })
      assert.strictEqual(row?.priority, 0)
      assert.strictEqual(row?.max_attempts, 3)
      assert.isNull(row?.retry_delay_seconds)
    }))

  it.effect("leaves agent and conversation NULL when the run has no conversation", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { id } = yield* queue.send({ queue: "task:cleanup", organizationId: "org-1", payload: {} })
      const row = yield* readRun(id)
      assert.isNull(row?.agent_id)
      assert.isNull(row?.conversation_id)
    }))

  it.effect("writes priority, delay, expiry, attempts and retry delay", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const expiresAt = new Date("2030-01-02T03:04:05.000Z")
      const { id } = yield* queue.send({
        ...base,
        priority: -7,
        delayMs: 90_000,
        expiresAt,
        maxAttempts: 9,
        retryDelaySeconds: 30
      })
      const row = yield* readRun(id)
      assert.strictEqual(row?.priority, -7)
      assert.strictEqual(row?.max_attempts, 9)
      assert.strictEqual(row?.retry_delay_seconds, 30)
      // run_at and created_at both come from the statement's now(), so the difference is the delay exactly.
      assert.strictEqual(Number(row?.delay_ms), 90_000)
      assert.strictEqual(new Date(row!.expires_at!).toISOString(), expiresAt.toISOString())
    }))

  it.effect("accepts an explicit runAt", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use } = yield* Database
      const runAt = new Date("2031-05-06T07:08:09.123Z")
      const { id } = yield* queue.send({ ...base, runAt })
      const [row] = yield* use("test", (sql) => sql<Array<{ run_at: string }>>`select run_at::text from runs where id = ${id}`)
      assert.strictEqual(new Date(row!.run_at).toISOString(), runAt.toISOString())
    }))

  it.effect("a null-prototype payload is a plain object and is stored", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const payload = Object.assign(Object.create(null) as Record<string, unknown>, {
        nested: Object.assign(Object.create(null) as Record<string, unknown>, { a: [1, "two"] })
      })
      const { id } = yield* queue.send({ ...base, payload: payload as never })
      const row = yield* readRun(id)
      assert.deepStrictEqual(row?.action_input, { nested: { a: [1, "two"] } })
    }))

  it.effect("an idempotency key returns the live run of the same organization", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const first = yield* queue.send({ ...base, idempotencyKey: "msg-42" })
      const again = yield* queue.send({ ...base, idempotencyKey: "msg-42", payload: { other: true } })
      assert.deepStrictEqual(again, { id: first.id, created: false })
      const otherOrg = yield* queue.send({ ...base, organizationId: "org-2", idempotencyKey: "msg-42" })
      assert.isTrue(otherOrg.created)
      assert.notStrictEqual(otherOrg.id, first.id)
      // The duplicate did not overwrite the first run's payload.
      assert.deepStrictEqual((yield* readRun(first.id))?.action_input, base.payload)
    }))

  it.effect("an idempotency key is free again once its run is terminal", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use } = yield* Database
      const first = yield* queue.send({ ...base, idempotencyKey: "msg-done" })
      yield* use("test", (sql) =>
        sql`update runs set status = 'completed', completed_at = now() where id = ${first.id}`)
      const next = yield* queue.send({ ...base, idempotencyKey: "msg-done" })
      assert.isTrue(next.created)
      assert.notStrictEqual(next.id, first.id)
    }))

  it.effect("concurrent sends with one key create exactly one run", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const results = yield* Effect.all(
        Array.from({ length: 8 }, () => queue.send({ ...base, idempotencyKey: "race" })),
        { concurrency: "unbounded" }
      )
      assert.strictEqual(results.filter((r) => r.created).length, 1)
      assert.strictEqual(new Set(results.map((r) => r.id)).size, 1)
    }))
})

layer(TestLayer, { excludeTestServices: true })("RunsQueue.sendMany", (it) => {
  it.effect("writes a batch in one statement and answers in input order", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use } = yield* Database
      const inputs = Array.from({ length: 50 }, (_, i) => ({ ...base, payload: { i } }))
      const results = yield* queue.sendMany(inputs)
      assert.strictEqual(results.length, 50)
      assert.isTrue(results.every((r) => r.created))
      const rows = yield* use("test", (sql) =>
        sql<Array<{ id: string; i: number; xid: string }>>`
          select id::text, (action_input->>'i')::int as i, xmin::text as xid
            from runs where id = any(${results.map((r) => r.id)}::bigint[])`)
      const byId = new Map(rows.map((row) => [Number(row.id), row]))
      results.forEach((r, i) => assert.strictEqual(byId.get(r.id)?.i, i))
      // One statement, so one transaction wrote every row.
      assert.strictEqual(new Set(rows.map((row) => row.xid)).size, 1)
    }))

  it.effect("writes each run's own options when only some runs of a batch set them", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const expiresAt = new Date("2030-01-02T03:04:05.000Z")
      const runAt = new Date("2031-05-06T07:08:09.123Z")
      const results = yield* queue.sendMany([
        base,
        { ...base, priority: 4, maxAttempts: 7 },
        { ...base, delayMs: 90_000, retryDelaySeconds: 12 },
        { ...base, runAt, expiresAt }
      ])
      const rows = yield* Effect.forEach(results, (result) => readRun(result.id))
      assert.deepStrictEqual(rows.map((row) => [row?.priority, row?.max_attempts, row?.retry_delay_seconds]), [
        [0, 3, null],
        [4, 7, null],
        [0, 3, 12],
        [0, 3, null]
      ])
      assert.strictEqual(Number(rows[0]?.delay_ms), 0)
      assert.strictEqual(Number(rows[2]?.delay_ms), 90_000)
      assert.strictEqual(new Date(rows[3]!.expires_at!).toISOString(), expiresAt.toISOString())
      assert.isNull(rows[0]?.expires_at)
      const { use } = yield* Database
      const [row] = yield* use("test", (sql) => sql<Array<{ run_at: string }>>`select run_at::text from runs where id = ${results[3]!.id}`)
      assert.strictEqual(new Date(row!.run_at).toISOString(), runAt.toISOString())
    }))

  it.effect("dedupes keys inside the batch and against live runs", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const existing = yield* queue.send({ ...base, idempotencyKey: "k-existing" })
      const results = yield* queue.sendMany([
        { ...base, idempotencyKey: "k-new" },
        { ...base, idempotencyKey: "k-existing" },
        { ...base, idempotencyKey: "k-new" },
        { ...base }
      ])
      assert.isTrue(results[0]!.created)
      assert.deepStrictEqual(results[1], { id: existing.id, created: false })
      assert.deepStrictEqual(results[2], { id: results[0]!.id, created: false })
      assert.isTrue(results[3]!.created)
    }))

  it.effect("an invalid run anywhere in the batch writes nothing and names its index", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const before = yield* countRuns
      const inputs: Array<SendRunInput> = Array.from({ length: 10 }, () => base)
      inputs[6] = { ...base, priority: 1.5 }
      const error = yield* Effect.flip(queue.sendMany(inputs))
      assert.instanceOf(error, InvalidRunInput)
      assert.strictEqual(error.field, "priority")
      assert.strictEqual((error as InvalidRunInput).index, 6)
      assert.strictEqual(yield* countRuns, before)
    }))

  it.effect("an empty batch writes nothing", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      assert.deepStrictEqual(yield* queue.sendMany([]), [])
    }))
})

describe("RunsQueue in a caller's transaction", () => {
  layer(TestLayer, { excludeTestServices: true })("tx", (it) => {
    it.effect("the run exists exactly when the caller's transaction commits", () =>
      Effect.gen(function*() {
        const queue = yield* RunsQueue
        const { db } = yield* Database
        const before = yield* countRuns
        const rolledBack = yield* Effect.promise(() =>
          db.transaction(async (tx) => {
            await Effect.runPromise(queue.sendMany([base, base], { tx }))
            tx.rollback()
          }).then(() => "committed", () => "rolled back"))
        assert.strictEqual(rolledBack, "rolled back")
        assert.strictEqual(yield* countRuns, before)

        const committed = yield* Effect.promise(() =>
          db.transaction((tx) => Effect.runPromise(queue.send(base, { tx }))))
        assert.isTrue(committed.created)
        assert.strictEqual(yield* countRuns, before + 1)
      }))

    it.effect("NOTIFY reaches listeners only after the caller commits", () =>
      Effect.gen(function*() {
        const queue = yield* RunsQueue
        const { db, sql } = yield* Database
        const received: Array<string> = []
        const listener = yield* Effect.promise(() =>
          sql.listen(runsChannel, (payload) => received.push(payload)))
        const fenceSeen = (fence: string) => received.includes(fence)
        const waitFor = (predicate: () => boolean) =>
          Effect.promise(async () => {
            const deadline = Date.now() + 5_000
            while (!predicate()) {
              if (Date.now() > deadline) throw new Error(`timed out; received ${JSON.stringify(received)}`)
              await new Promise((resolve) => setTimeout(resolve, 10))
            }
          })
        yield* Effect.promise(() =>
          db.transaction(async (tx) => {
            await Effect.runPromise(queue.send({ ...base, queue: "notify-me" }, { tx }))
            // A committed NOTIFY sent after ours: listeners get notifications in commit order, so once
            // the fence arrives, ours would have arrived too had it been sent before commit.
            await sql`select pg_notify(${runsChannel}, 'fence-1')`
            await Effect.runPromise(waitFor(() => fenceSeen("fence-1")))
            assert.notInclude(received, "notify-me")
          }))
        yield* waitFor(() => received.includes("notify-me"))
        yield* Effect.promise(() => listener.unlisten())
      }))
  })
})
