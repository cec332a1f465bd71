import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { LeaseLost, RunCancelled, RunNotFound } from "../../src/runs/runErrors.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { leaseExpiredMessage } from "../../src/runs/sql/runSweepExpiredLeases.ts"
import { freshQueue, movableClock, readRun, runInput, runsTestLayer } from "../support/runsHarness.ts"

const clock = movableClock()

/** Sends one run to a fresh queue and claims it. */
const claimOne = (name: string, extra: Parameters<typeof runInput>[1] = {}) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    const q = freshQueue(name)
    yield* queue.send(runInput(q, extra))
    const [run] = yield* queue.claim(q, { limit: 1 })
    assert.isDefined(run, "the run was claimable")
    return { queue, q, run: run! }
  })

layer(runsTestLayer(clock), { excludeTestServices: true })("RunsQueue settles", (it) => {
  it.effect("fail with a fixed retry delay: pending again after exactly that delay, attempt spent, error kept", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("fixed", { retryDelaySeconds: 30, maxAttempts: 3 })
      yield* queue.fail(run, "model timed out")
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "pending")
      assert.strictEqual(row.attempts, 1)
      assert.strictEqual(row.error_message, "model timed out")
      assert.isNull(row.claimed_by)
      assert.strictEqual(row.run_at.getTime() - clock.now().getTime(), 30_000)
      clock.advance(29_999)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 1 }), [])
      clock.advance(1)
      const [again] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(again?.id, run.id)
      assert.strictEqual(again?.attempts, 1)
    }))

  it.effect("fail without a fixed delay backs off exponentially with jitter, capped at 5 minutes", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("exponential", { maxAttempts: 12 })
      let current = run
      // attempts after the failure -> base delay in seconds; the jittered delay is in [base/2, base].
      for (const base of [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]) {
        yield* queue.fail(current, "again")
        const row = yield* readRun(run.id)
        const delay = row.run_at.getTime() - clock.now().getTime()
        assert.isAtLeast(delay, (base * 1000) / 2, `attempt ${row.attempts}`)
        assert.isAtMost(delay, base * 1000, `attempt ${row.attempts}`)
        // run_at has microseconds; the Date read back is truncated to the millisecond below it.
        clock.advance(delay + 1)
        const [next] = yield* queue.claim(q, { limit: 1 })
        assert.strictEqual(next?.id, run.id)
        current = next!
      }
    }))

  it.effect("the last attempt's failure ends the run failed with the error text", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("max", { maxAttempts: 2, retryDelaySeconds: 0 })
      yield* queue.fail(run, "first")
      const [second] = yield* queue.claim(q, { limit: 1 })
      yield* queue.fail(second!, "second: out of credits")
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "failed")
      assert.strictEqual(row.attempts, 2)
      assert.strictEqual(row.error_message, "second: out of credits")
      assert.strictEqual(row.completed_at?.getTime(), clock.now().getTime())
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 1 }), [])
    }))

  it.effect("defer spends no attempt and holds the run until the delay has passed", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("defer", { maxAttempts: 1 })
      for (let i = 0; i < 3; i++) {
        const [claimed] = i === 0 ? [run] : yield* queue.claim(q, { limit: 1 })
        yield* queue.defer(claimed!, 10_000)
        assert.deepStrictEqual(yield* queue.claim(q, { limit: 1 }), [])
        clock.advance(10_000)
      }
      const [last] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(last?.attempts, 0)
      // Still the first attempt, so a failure now ends it.
      yield* queue.fail(last!, "x")
      assert.strictEqual((yield* readRun(run.id)).status, "failed")
    }))

  it.effect("release spends no attempt and makes the run claimable at once", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("release", { maxAttempts: 1 })
      yield* queue.release(run)
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "pending")
      assert.strictEqual(row.attempts, 0)
      const [again] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(again?.id, run.id)
    }))

  it.effect("the sweep takes back an expired claim counting the lost attempt; the old owner gets LeaseLost", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("sweep", { maxAttempts: 3 })
      clock.advance(queue.config.leaseMs)
      // Not yet: the lease runs out strictly after leaseMs.
      yield* queue.sweep
      assert.strictEqual((yield* readRun(run.id)).status, "claimed")
      clock.advance(1)
      const swept = yield* queue.sweep
      assert.isAtLeast(swept.returned, 1)
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "pending")
      assert.strictEqual(row.attempts, 1)
      assert.isNull(row.claimed_by)
      for (const settle of [queue.heartbeat(run), queue.complete(run), queue.fail(run, "x"), queue.defer(run, 1), queue.release(run)]) {
        assert.instanceOf(yield* Effect.flip(settle), LeaseLost)
      }
      // Due at once, and the handler sees the lost attempt.
      const [again] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(again?.attempts, 1)
    }))

  it.effect("a heartbeat keeps the sweep away", () =>
    Effect.gen(function*() {
      const { queue, run } = yield* claimOne("kept")
      clock.advance(queue.config.leaseMs - 1)
      yield* queue.heartbeat(run)
      clock.advance(queue.config.leaseMs - 1)
      yield* queue.sweep
      assert.strictEqual((yield* readRun(run.id)).status, "claimed")
      yield* queue.complete(run)
    }))

  it.effect("a run that keeps killing its worker ends failed at max_attempts instead of looping", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("killer", { maxAttempts: 2 })
      clock.advance(queue.config.leaseMs + 1)
      yield* queue.sweep
      const [second] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(second?.id, run.id)
      clock.advance(queue.config.leaseMs + 1)
      const swept = yield* queue.sweep
      assert.isAtLeast(swept.failed, 1)
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "failed")
      assert.strictEqual(row.attempts, 2)
      assert.strictEqual(row.error_message, leaseExpiredMessage)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 1 }), [])
    }))

  it.effect("batch settles say which runs were settled, cancelled or lost", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("many")
      yield* queue.sendMany(Array.from({ length: 5 }, () => runInput(q)))
      const [a, b, c, d, e] = yield* queue.claim(q, { limit: 5 })
      yield* queue.complete(a!)
      yield* queue.cancel(b!.id)
      const outcome = yield* queue.completeMany([a!, b!, c!, d!])
      assert.deepStrictEqual(outcome, { settled: [c!.id, d!.id], cancelled: [b!.id], lost: [a!.id] })
      const failed = yield* queue.failMany([{ run: e!, error: "e" }, { run: a!, error: "a" }])
      assert.deepStrictEqual(failed, { settled: [e!.id], cancelled: [], lost: [a!.id] })
      assert.deepStrictEqual(yield* queue.completeMany([]), { settled: [], cancelled: [], lost: [] })
    }))

  it.effect("completeManyAndClaim completes its runs and claims in one call, saying which were settled, cancelled or lost", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("complete-and-claim")
      const sent = yield* queue.sendMany(Array.from({ length: 6 }, () => runInput(q)))
      const [a, b, c] = yield* queue.claim(q, { limit: 3 })
      yield* queue.complete(a!)
      yield* queue.cancel(b!.id)
      const { completed, claimed } = yield* queue.completeManyAndClaim([a!, b!, c!], q, { limit: 2 })
      assert.deepStrictEqual(completed, { settled: [c!.id], cancelled: [b!.id], lost: [a!.id] })
      assert.deepStrictEqual(claimed.map((run) => run.id), [sent[3]!.id, sent[4]!.id])
      assert.strictEqual((yield* readRun(c!.id)).status, "completed")
      assert.strictEqual((yield* readRun(sent[3]!.id)).status, "claimed")
      // A limit of 0 completes only; nothing to complete claims only.
      const onlyCompleted = yield* queue.completeManyAndClaim(claimed, q, { limit: 0 })
      assert.deepStrictEqual(onlyCompleted, { completed: { settled: claimed.map((run) => run.id), cancelled: [], lost: [] }, claimed: [] })
      const onlyClaimed = yield* queue.completeManyAndClaim([], q, { limit: 5 })
      assert.deepStrictEqual(onlyClaimed.claimed.map((run) => run.id), [sent[5]!.id])
      assert.deepStrictEqual(onlyClaimed.completed, { settled: [], cancelled: [], lost: [] })
    }))

  it.effect("completeManyAndClaim refuses a bad limit, queue or claim token, and then completes nothing", () =>
    Effect.gen(function*() {
      const { queue, q, run } = yield* claimOne("complete-and-claim-bad")
      const refusals = [
        queue.completeManyAndClaim([run], q, { limit: -1 }),
        queue.completeManyAndClaim([run], q, { limit: 1_001 }),
        queue.completeManyAndClaim([run], "", { limit: 1 }),
        queue.completeManyAndClaim([{ id: run.id, claimToken: "not-a-uuid" }], q, { limit: 1 })
      ]
      for (const refused of refusals) {
        assert.strictEqual((yield* Effect.flip(refused))._tag, "InvalidRunsArgument")
      }
      assert.strictEqual((yield* readRun(run.id)).status, "claimed")
    }))

  it.effect("cancel of a pending run cancels it at once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("cancel-pending")
      const { id } = yield* queue.send(runInput(q))
      assert.deepStrictEqual(yield* queue.cancel(id), { _tag: "Cancelled" })
      const row = yield* readRun(id)
      assert.strictEqual(row.status, "cancelled")
      assert.strictEqual(row.completed_at?.getTime(), clock.now().getTime())
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 1 }), [])
      assert.deepStrictEqual(yield* queue.cancel(id), { _tag: "AlreadyFinal", status: "cancelled" })
      assert.deepStrictEqual(yield* Effect.flip(queue.cancel(987_654_321)), new RunNotFound({ runId: 987_654_321 }))
    }))

  it.effect("cancel of a claimed run ends it at the worker's next heartbeat, which is told", () =>
    Effect.gen(function*() {
      const { queue, run } = yield* claimOne("cancel-claimed")
      assert.deepStrictEqual(yield* queue.cancel(run.id), { _tag: "CancelRequested" })
      const requested = yield* readRun(run.id)
      assert.strictEqual(requested.status, "claimed")
      assert.strictEqual(requested.cancel_requested_at?.getTime(), clock.now().getTime())
      assert.deepStrictEqual(yield* Effect.flip(queue.heartbeat(run)), new RunCancelled({ runId: run.id }))
      const row = yield* readRun(run.id)
      assert.strictEqual(row.status, "cancelled")
      assert.isNull(row.claimed_by)
      // Settled: anything the worker does next is LeaseLost.
      assert.instanceOf(yield* Effect.flip(queue.complete(run)), LeaseLost)
    }))

  it.effect("cancel of a claimed run ends it at the worker's settle, whatever the settle", () =>
    Effect.gen(function*() {
      const settles = ["complete", "fail", "defer", "release"] as const
      for (const settle of settles) {
        const { queue, run } = yield* claimOne(`cancel-${settle}`)
        yield* queue.cancel(run.id)
        const result = settle === "complete"
          ? queue.complete(run)
          : settle === "fail"
          ? queue.fail(run, "x")
          : settle === "defer"
          ? queue.defer(run, 1_000)
          : queue.release(run)
        assert.deepStrictEqual(yield* Effect.flip(result), new RunCancelled({ runId: run.id }), settle)
        assert.strictEqual((yield* readRun(run.id)).status, "cancelled", settle)
      }
    }))

  it.effect("the sweep ends an expired claim cancelled when its cancellation was requested", () =>
    Effect.gen(function*() {
      const { queue, run } = yield* claimOne("cancel-swept")
      yield* queue.cancel(run.id)
      clock.advance(queue.config.leaseMs + 1)
      assert.isAtLeast((yield* queue.sweep).cancelled, 1)
      assert.strictEqual((yield* readRun(run.id)).status, "cancelled")
    }))
})
