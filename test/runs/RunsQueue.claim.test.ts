import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { InvalidRunsArgument, LeaseLost } from "../../src/runs/runErrors.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { freshQueue, movableClock, readRun, runInput, runsTestLayer } from "../support/runsHarness.ts"

const clock = movableClock()

layer(runsTestLayer(clock), { excludeTestServices: true })("RunsQueue.claim", (it) => {
  it.effect("claims by priority, then run_at, then id, up to the limit", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("order")
      const base = clock.now().getTime() - 10_000
      const [low, highLate, highEarly, highEarlySecond] = yield* queue.sendMany([
        runInput(q, { priority: 0, runAt: new Date(base) }),
        runInput(q, { priority: 5, runAt: new Date(base + 2_000) }),
        runInput(q, { priority: 5, runAt: new Date(base + 1_000) }),
        runInput(q, { priority: 5, runAt: new Date(base + 1_000) })
      ])
      const first = yield* queue.claim(q, { limit: 2 })
      assert.deepStrictEqual(first.map((run) => run.id), [highEarly!.id, highEarlySecond!.id])
      const rest = yield* queue.claim(q, { limit: 10 })
      assert.deepStrictEqual(rest.map((run) => run.id), [highLate!.id, low!.id])
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [])
    }))

  it.effect("answers the run with its payload, scope, attempts and lease, and marks it claimed by this process", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("shape")
      const { id } = yield* queue.send(runInput(q, { agentId: "a", conversationId: "c", payload: { text: "hi" }, maxAttempts: 4 }))
      const [run] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(run?.id, id)
      assert.deepStrictEqual(run?.payload, { text: "hi" })
      assert.strictEqual(run?.organizationId, "org-1")
      assert.strictEqual(run?.agentId, "a")
      assert.strictEqual(run?.conversationId, "c")
      assert.strictEqual(run?.attempts, 0)
      assert.strictEqual(run?.maxAttempts, 4)
      assert.strictEqual(run!.leaseExpiresAt.getTime() - run!.claimedAt.getTime(), queue.config.leaseMs)
      assert.strictEqual(run!.claimedAt.getTime(), clock.now().getTime())
      const row = yield* readRun(id)
      assert.strictEqual(row.status, "claimed")
      assert.strictEqual(row.claimed_by, queue.claimantId)
    }))

  it.effect("does not claim a run before its run_at, and claims it once the clock reaches it", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("run-at")
      const { id } = yield* queue.send(runInput(q, { runAt: new Date(clock.now().getTime() + 30_000) }))
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 5 }), [])
      clock.advance(29_999)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 5 }), [])
      clock.advance(1)
      assert.deepStrictEqual((yield* queue.claim(q, { limit: 5 })).map((run) => run.id), [id])
    }))

  it.effect("never claims an expired run", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("expiry")
      const { id } = yield* queue.send(runInput(q, { expiresAt: new Date(clock.now().getTime() + 5_000) }))
      clock.advance(5_000)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 5 }), [])
      assert.strictEqual((yield* readRun(id)).status, "pending")
    }))

  it.effect("claims only its own queue", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("mine")
      yield* queue.send(runInput(freshQueue("other")))
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 5 }), [])
    }))

  it.effect("refuses a limit outside 1-1,000, naming it", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      for (const limit of [0, -1, 1.5, 1_001, Number.NaN]) {
        const error = yield* Effect.flip(queue.claim("q", { limit }))
        assert.instanceOf(error, InvalidRunsArgument)
        assert.strictEqual((error as InvalidRunsArgument).argument, "limit")
      }
    }))

  it.effect("a heartbeat moves the lease forward; a settle of a run settled already is LeaseLost", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("heartbeat")
      yield* queue.send(runInput(q))
      const [run] = yield* queue.claim(q, { limit: 1 })
      clock.advance(60_000)
      yield* queue.heartbeat(run!)
      const row = yield* readRun(run!.id)
      assert.strictEqual(row.lease_expires_at!.getTime(), clock.now().getTime() + queue.config.leaseMs)
      yield* queue.complete(run!)
      const again = yield* Effect.flip(queue.complete(run!))
      assert.deepStrictEqual(again, new LeaseLost({ runId: run!.id, operation: "complete" }))
      const beat = yield* Effect.flip(queue.heartbeat(run!))
      assert.instanceOf(beat, LeaseLost)
      const row2 = yield* readRun(run!.id)
      assert.strictEqual(row2.status, "completed")
      assert.strictEqual(row2.completed_at!.getTime(), clock.now().getTime())
      assert.isNull(row2.lease_expires_at)
    }))

  it.effect("stats counts each status and the oldest due run's wait", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stats")
      const empty = yield* queue.stats(q)
      assert.deepStrictEqual(empty, { pending: 0, claimed: 0, completed: 0, failed: 0, cancelled: 0, oldestPendingAgeMs: null })
      const start = clock.now().getTime()
      const runs = yield* queue.sendMany([
        runInput(q, { runAt: new Date(start - 4_000), maxAttempts: 1 }),
        runInput(q, { runAt: new Date(start - 3_000) }),
        runInput(q, { runAt: new Date(start - 2_000) }),
        runInput(q, { runAt: new Date(start - 1_000) }),
        runInput(q, { runAt: new Date(start - 500) }),
        // Not due yet: not waiting, so not the oldest.
        runInput(q, { runAt: new Date(start + 60_000) })
      ])
      const [a, b, c] = yield* queue.claim(q, { limit: 3 })
      yield* queue.fail(a!, "boom")
      yield* queue.complete(b!)
      assert.strictEqual(c!.id, runs[2]!.id)
      yield* queue.cancel(runs[3]!.id)
      clock.advance(1_000)
      const stats = yield* queue.stats(q)
      assert.deepStrictEqual(stats, { pending: 2, claimed: 1, completed: 1, failed: 1, cancelled: 1, oldestPendingAgeMs: 1_500 })
    }))
})
