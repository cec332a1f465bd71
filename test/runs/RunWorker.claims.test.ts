/**
 * The work loop's bookkeeping of claims, found by a review after the happy paths passed: a handler
 * that interrupts itself, a failure or answer that cannot be printed, a heartbeat racing a settle, a
 * settle retried after its answer was lost, and a run claimed again by the same process after a sweep.
 * Each case failed before its fix (see the commit that added this file).
 */
import { assert, layer } from "@effect/vitest"
import { Deferred, Effect, Layer } from "effect"
import { PrometheusMetrics } from "effect/observability"
import { Database } from "../../src/db/Database.ts"
import { DatabaseError } from "../../src/db/DatabaseError.ts"
import { type RunHandlerInput, RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { eventually } from "../support/lockHarness.ts"
import { freshQueue, movableClock, readRun, runInput, startWorker } from "../support/runsHarness.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

/**
 * Faults and counts the tests steer: the next releaseMany commits and then reports an error; every
 * completeMany and completeManyAndClaim with runs to complete fail while failCompletes is set, and
 * completeManyAndClaim alone while failCompletingClaims is (its claim part failing, say); heartbeats
 * counted, and an answer that found runs cancelled or lost held back (after its statement committed)
 * until `heartbeatAnswers`, when set, is done; completions answered counted.
 */
const harness = {
  releaseAnswerLost: 0,
  failCompletes: false,
  failCompletingClaims: false,
  heartbeatsStarted: 0,
  heartbeatsEnded: 0,
  heartbeatAnswers: undefined as Deferred.Deferred<void> | undefined,
  heartbeatsHeld: 0,
  completionsAnswered: 0,
  /** When set, the next completeMany failed by failCompletes waits for it first (then it is unset). */
  failingCompleteHeld: undefined as Deferred.Deferred<void> | undefined,
  completingClaimsFailed: 0
}
const clock = movableClock()

const HarnessQueue = Layer.effect(RunsQueue, Effect.gen(function*() {
  const real = yield* RunsQueue
  return RunsQueue.of({
    ...real,
    releaseMany: (runs) =>
      Effect.flatMap(real.releaseMany(runs), (outcome) => {
        if (runs.length === 0 || harness.releaseAnswerLost === 0) return Effect.succeed(outcome)
        harness.releaseAnswerLost--
        return Effect.fail(new DatabaseError({ operation: "RunsQueue.release", message: "injected: connection reset after commit", retryable: true, cause: null }))
      }),
    completeMany: (runs) =>
      Effect.suspend(() => {
        if (runs.length === 0 || !harness.failCompletes) return real.completeMany(runs)
        const held = harness.failingCompleteHeld
        harness.failingCompleteHeld = undefined
        return Effect.andThen(
          held === undefined ? Effect.void : Deferred.await(held),
          Effect.fail(new DatabaseError({ operation: "RunsQueue.complete", message: "injected", retryable: true, cause: null }))
        )
      }),
    completeManyAndClaim: (runs, q, options) =>
      runs.length > 0 && (harness.failCompletes || harness.failCompletingClaims)
        ? Effect.sync(() => void harness.completingClaimsFailed++).pipe(
          Effect.andThen(Effect.fail(new DatabaseError({ operation: "RunsQueue.completeManyAndClaim", message: "injected", retryable: true, cause: null })))
        )
        : real.completeManyAndClaim(runs, q, options).pipe(
          Effect.tap(() => Effect.sync(() => void (runs.length > 0 && harness.completionsAnswered++)))
        ),
    heartbeatMany: (runs) =>
      Effect.suspend(() => {
        harness.heartbeatsStarted++
        return real.heartbeatMany(runs).pipe(
          Effect.tap((outcome) => {
            const held = harness.heartbeatAnswers
            if (held === undefined || outcome.cancelled.length + outcome.lost.length === 0) return Effect.void
            harness.heartbeatsHeld++
            return Deferred.await(held)
          }),
          Effect.ensuring(Effect.sync(() => void harness.heartbeatsEnded++))
        )
      })
  })
})).pipe(Layer.provideMerge(RunsQueue.layerWith({ now: clock.now, leaseMs: 3_000, heartbeatMs: 200 })))

const TestLayer = RunWorker.layer.pipe(Layer.provideMerge(HarnessQueue), Layer.provideMerge(testDatabaseLayer()))

/** A counter's value for one queue from /metrics' text (0 when absent). */
const counter = (name: string, queue: string) =>
  Effect.map(PrometheusMetrics.format(), (text) => {
    const line = text.split("\n").find((l) => l.startsWith(`${name}{`) && l.includes(`queue="${queue}"`))
    return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(" ") + 1))
  })

/**
 * A handler that counts its calls for runs of payload kind "x" and the most of them running at once:
 * the first call runs `first`, later ones 50 ms. Runs of any other kind (the ones a test sends only
 * to wake the worker) end at once.
 */
const countingHandler = (first: Effect.Effect<void>) => {
  const counts = { calls: 0, running: 0, maxRunning: 0 }
  const handler = ({ run }: RunHandlerInput) =>
    Effect.suspend(() => {
      if (run.payload["kind"] !== "x") return Effect.void
      const call = ++counts.calls
      counts.running++
      counts.maxRunning = Math.max(counts.maxRunning, counts.running)
      return (call === 1 ? first : Effect.sleep(50)).pipe(Effect.ensuring(Effect.sync(() => void counts.running--)))
    })
  return { handler, counts }
}

layer(TestLayer, { excludeTestServices: true })("RunWorker claims", (it) => {
  it.effect("a handler that ends interrupted by itself spends an attempt like a failure, instead of being released and re-run at once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("self-interrupt")
      const { id } = yield* queue.send(runInput(q, { retryDelaySeconds: 3_600 }))
      let calls = 0
      const worker = yield* startWorker({ queue: q, handler: () => Effect.sync(() => void calls++).pipe(Effect.andThen(Effect.interrupt)), pollIntervalMs: 50 })
      yield* eventually("the attempt failed", Effect.map(readRun(id), (row) => row.attempts === 1), 5_000)
      yield* worker.stop
      const row = yield* readRun(id)
      assert.deepStrictEqual({ calls, status: row.status, error: row.error_message }, { calls: 1, status: "pending", error: "the handler was interrupted" })
    }))

  it.effect("a failure that cannot be printed, and an answer of null, still settle the run (no slot leaked, no lease renewed for ever)", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("unprintable")
      const unprintable = { toString: () => { throw new Error("no") }, toJSON: () => { throw new Error("no") } }
      const [failing, nulled] = yield* queue.sendMany([
        runInput(q, { payload: { kind: "unprintable" }, retryDelaySeconds: 3_600 }),
        runInput(q, { payload: { kind: "null" }, retryDelaySeconds: 3_600 })
      ])
      const worker = yield* startWorker({
        queue: q,
        pollIntervalMs: 50,
        handler: ({ run }: RunHandlerInput) => run.payload["kind"] === "null" ? Effect.succeed(null as never) : Effect.fail(unprintable)
      })
      yield* eventually("both attempts failed", Effect.map(Effect.all([readRun(failing!.id), readRun(nulled!.id)]), (rows) => rows.every((row) => row.attempts === 1)), 5_000)
      yield* worker.stop
      assert.strictEqual((yield* readRun(failing!.id)).error_message, "[object Object]")
      assert.strictEqual((yield* readRun(nulled!.id)).error_message, "the handler answered null: not void, Release, or Defer of 0 ms to a year")
    }))

  it.effect("a heartbeat behind a settle on the same run does not count the completed run as lost", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql } = yield* Database
      const q = freshQueue("heartbeat-race")
      const { id } = yield* queue.send(runInput(q))
      const gate = yield* Deferred.make<void>()
      const worker = yield* startWorker({ queue: q, handler: () => Deferred.await(gate), pollIntervalMs: 50 })
      yield* eventually("claimed", Effect.map(readRun(id), (row) => row.status === "claimed"), 5_000)
      // Another session holds the run's row (an operator's query, a cancel): the settle waits on it.
      const reserved = yield* Effect.promise(() => sql.reserve())
      yield* Effect.promise(() => reserved`begin`)
      yield* Effect.promise(() => reserved`select id from runs where id = ${id} for update`)
      yield* Deferred.succeed(gate, undefined)
      yield* eventually("the complete waits on the row", Effect.promise(async () => {
        const [row] = await sql<Array<{ n: number }>>`
          select count(*)::int as n from pg_stat_activity where wait_event_type = 'Lock' and query like '%update runs r%'`
        return row!.n >= 1
      }), 5_000)
      // A heartbeat starts while the complete waits (every 200 ms), includes the run and waits behind it too.
      const started = harness.heartbeatsStarted
      yield* eventually("a heartbeat started", Effect.sync(() => harness.heartbeatsStarted >= started + 1), 5_000)
      yield* eventually("the heartbeat waits on the row too", Effect.promise(async () => {
        const [row] = await sql<Array<{ n: number }>>`
          select count(*)::int as n from pg_stat_activity where wait_event_type = 'Lock' and query like '%update runs r%'`
        return row!.n >= 2
      }), 5_000)
      yield* Effect.promise(() => reserved`commit`)
      reserved.release()
      yield* eventually("completed", Effect.map(readRun(id), (row) => row.status === "completed"), 5_000)
      const ended = harness.heartbeatsStarted
      yield* eventually("the heartbeats that waited have answered", Effect.sync(() => harness.heartbeatsEnded >= ended), 5_000)
      yield* worker.stop
      assert.deepStrictEqual(
        { completed: yield* counter("runlane_runs_completed_total", q), lost: yield* counter("runlane_runs_lease_lost_total", q) },
        { completed: 1, lost: 0 }
      )
    }))

  it.effect("a settle retried after its answer was lost does not touch the run's next claim: one handler at a time", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("lost-answer")
      const { id } = yield* queue.send(runInput(q))
      let calls = 0
      let running = 0
      let maxRunning = 0
      const handler = () =>
        Effect.suspend(() => {
          calls++
          if (calls === 1) return Effect.succeed({ _tag: "Release" as const })
          running++
          maxRunning = Math.max(maxRunning, running)
          // Longer than the settle's retry pause (1 s): the retried Release comes while this runs.
          return Effect.sleep(2_000).pipe(Effect.ensuring(Effect.sync(() => void running--)))
        })
      harness.releaseAnswerLost = 1
      const worker = yield* startWorker({ queue: q, handler, concurrency: 2, pollIntervalMs: 50 })
      yield* eventually("completed", Effect.map(readRun(id), (row) => row.status === "completed"), 15_000)
      yield* worker.stop
      harness.releaseAnswerLost = 0
      assert.deepStrictEqual({ calls, maxRunning }, { calls: 2, maxRunning: 1 })
    }))

  it.effect("a run claimed again by this process after a sweep took it: the old handler is interrupted first", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("reclaim")
      const { id } = yield* queue.send(runInput(q))
      let calls = 0
      let running = 0
      let maxRunning = 0
      const interrupted: Array<number> = []
      const handler = () =>
        Effect.suspend(() => {
          const call = ++calls
          running++
          maxRunning = Math.max(maxRunning, running)
          return Effect.sleep(call === 1 ? 60_000 : 100).pipe(
            Effect.onInterrupt(() => Effect.sync(() => void interrupted.push(call))),
            Effect.ensuring(Effect.sync(() => void running--))
          )
        })
      const worker = yield* startWorker({ queue: q, handler, concurrency: 2, pollIntervalMs: 50 })
      yield* eventually("the first handler runs", Effect.sync(() => running === 1), 5_000)
      // The lease runs out (a stall longer than the lease) and a sweep takes the claim back.
      clock.advance(10_000)
      assert.strictEqual((yield* queue.sweep).returned, 1)
      yield* eventually("completed by the second claim", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      yield* worker.stop
      assert.deepStrictEqual({ calls, maxRunning, interrupted }, { calls: 2, maxRunning: 1, interrupted: [1] })
    }))

  it.effect("an answer whose getters throw fails the attempt like any bad answer (no slot leaked)", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("getter")
      const { id } = yield* queue.send(runInput(q, { retryDelaySeconds: 3_600 }))
      const answer = { get _tag(): string { throw new Error("no tag") } }
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 50, handler: () => Effect.succeed(answer as never) })
      yield* eventually("the attempt failed", Effect.map(readRun(id), (row) => row.attempts === 1 && row.status === "pending"), 5_000)
      yield* worker.stop
    }))

  it.effect("a finished run whose settle keeps failing keeps its lease: the sweep does not take it and count an attempt", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("settle-keeps-failing")
      const { id } = yield* queue.send(runInput(q, { maxAttempts: 1 }))
      let calls = 0
      harness.failCompletes = true
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 50, handler: () => Effect.sync(() => void calls++) })
      yield* eventually("the handler ran", Effect.sync(() => calls === 1), 5_000)
      // Twice: 2 s of the 3 s lease pass, then a heartbeat that started after that must renew it.
      for (let round = 0; round < 2; round++) {
        clock.advance(2_000)
        const started = harness.heartbeatsStarted
        yield* eventually("a heartbeat after the clock moved", Effect.sync(() => harness.heartbeatsEnded > started), 5_000)
      }
      assert.deepStrictEqual(yield* queue.sweep, { returned: 0, failed: 0, cancelled: 0 })
      harness.failCompletes = false
      yield* eventually("completed once the settle succeeds", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      yield* worker.stop
      assert.strictEqual(calls, 1)
    }))

  it.effect("completions whose claim statement fails are settled on their own: a failing claim does not hold finished runs", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("completing-claim-fails")
      const { id } = yield* queue.send(runInput(q))
      harness.failCompletingClaims = true
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 50, handler: () => Effect.void })
      yield* eventually("completed by the settler's own statement", Effect.map(readRun(id), (row) => row.status === "completed"), 5_000)
      yield* worker.stop
    }).pipe(Effect.ensuring(Effect.sync(() => void (harness.failCompletingClaims = false)))))

  it.effect("a run a heartbeat cancelled while its completion was queued is counted once, whichever answer is read first", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("cancel-settle-race")
      const { id } = yield* queue.send(runInput(q))
      const handlerGate = yield* Deferred.make<void>()
      const worker = yield* startWorker({ queue: q, handler: () => Deferred.await(handlerGate), pollIntervalMs: 50 })
      yield* eventually("claimed", Effect.map(readRun(id), (row) => row.status === "claimed"), 5_000)
      // The heartbeat that applies the cancellation has its answer held back after its commit.
      const heartbeatAnswers = yield* Deferred.make<void>()
      harness.heartbeatAnswers = heartbeatAnswers
      const endedBefore = harness.heartbeatsEnded
      yield* queue.cancel(id)
      yield* eventually("a heartbeat cancelled the run", Effect.map(readRun(id), (row) => row.status === "cancelled"), 5_000)
      // Meanwhile the handler ends: its completion finds the run no longer claimed (lost) and is read first.
      const answeredBefore = harness.completionsAnswered
      yield* Deferred.succeed(handlerGate, undefined)
      yield* eventually("the completion answered", Effect.sync(() => harness.completionsAnswered > answeredBefore), 5_000)
      harness.heartbeatAnswers = undefined
      yield* Deferred.succeed(heartbeatAnswers, undefined)
      yield* eventually("the held heartbeat answered", Effect.sync(() => harness.heartbeatsEnded > endedBefore), 5_000)
      yield* worker.stop
      const lost = yield* counter("runlane_runs_lease_lost_total", q)
      const cancelled = yield* counter("runlane_runs_cancelled_while_claimed_total", q)
      assert.strictEqual(lost + cancelled, 1, `lost ${lost}, cancelled ${cancelled}`)
    }).pipe(Effect.ensuring(Effect.sync(() => void (harness.heartbeatAnswers = undefined)))))

  it.effect("a run swept away while its handler is stopped is counted lost by the release that finds it gone", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stopped-lost")
      const { id } = yield* queue.send(runInput(q))
      const worker = yield* startWorker({ queue: q, handler: () => Effect.never, pollIntervalMs: 600_000, stopTimeoutMs: 100 })
      yield* eventually("claimed", Effect.map(readRun(id), (row) => row.status === "claimed"), 5_000)
      // The lease runs out and a sweep takes the run back; the heartbeat that finds it gone is held, so
      // only the release at stop can tell.
      const heartbeatAnswers = yield* Deferred.make<void>()
      harness.heartbeatAnswers = heartbeatAnswers
      const heldBefore = harness.heartbeatsHeld
      clock.advance(10_000)
      assert.strictEqual((yield* queue.sweep).returned, 1)
      yield* eventually("a heartbeat found the run gone", Effect.sync(() => harness.heartbeatsHeld > heldBefore), 5_000)
      yield* worker.stop
      assert.strictEqual(yield* counter("runlane_runs_lease_lost_total", q), 1)
    }).pipe(Effect.ensuring(Effect.sync(() => void (harness.heartbeatAnswers = undefined)))))

  it.effect("a finished run whose settle kept failing, swept and claimed again by this process: its lost lease is counted once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("reclaimed-settling")
      const { id } = yield* queue.send(runInput(q))
      let calls = 0
      harness.failCompletes = true
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 50, handler: () => Effect.sync(() => void calls++) })
      yield* eventually("the handler ran", Effect.sync(() => calls === 1), 5_000)
      // The lease runs out between two heartbeats, a sweep returns the run, and this worker claims it
      // again while the first claim's completion is still queued (its statements keep failing).
      clock.advance(10_000)
      assert.strictEqual((yield* queue.sweep).returned, 1)
      yield* eventually("claimed again", Effect.map(readRun(id), (row) => row.status === "claimed" && row.attempts === 1), 5_000)
      harness.failCompletes = false
      yield* eventually("completed by the second claim", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      yield* worker.stop
      assert.deepStrictEqual({ calls, lost: yield* counter("runlane_runs_lease_lost_total", q) }, { calls: 2, lost: 1 })
    }).pipe(Effect.ensuring(Effect.sync(() => void (harness.failCompletes = false)))))

  it.effect("a stale claim's completion put back by a failed settle beside the new claim's: the run is counted completed once and lost once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stale-put-back")
      const { id } = yield* queue.send(runInput(q))
      let calls = 0
      harness.failCompletes = true
      const held = yield* Deferred.make<void>()
      harness.failingCompleteHeld = held
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 50, handler: () => Effect.sync(() => void calls++) })
      // The first claim's completion is in the settler's statement, held, when the run is swept and
      // claimed again: it is not among the queued settles a new claim drops.
      yield* eventually("the first completion held", Effect.sync(() => calls === 1 && harness.failingCompleteHeld === undefined), 5_000)
      clock.advance(10_000)
      assert.strictEqual((yield* queue.sweep).returned, 1)
      const failedBefore = harness.completingClaimsFailed
      yield* eventually("the second claim's completion queued", Effect.sync(() => calls === 2 && harness.completingClaimsFailed > failedBefore), 5_000)
      // The held statement fails and its batch is put back, beside the second claim's completion.
      harness.failCompletes = false
      yield* Deferred.succeed(held, undefined)
      yield* eventually("completed", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      yield* worker.stop
      assert.deepStrictEqual(
        { calls, completed: yield* counter("runlane_runs_completed_total", q), lost: yield* counter("runlane_runs_lease_lost_total", q) },
        { calls: 2, completed: 1, lost: 1 }
      )
    }).pipe(Effect.ensuring(Effect.sync(() => {
      harness.failCompletes = false
      harness.failingCompleteHeld = undefined
    }))))

  it.effect("a stale handler slow to end (found lost by a heartbeat) finishes before the run's new claim starts its handler", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stale-slow")
      const { id } = yield* queue.send(runInput(q, { payload: { kind: "x" } }))
      // The first is uninterruptible for a while (a call it must not abandon half-way).
      const { handler, counts } = countingHandler(Effect.uninterruptible(Effect.sleep(1_500)))
      // A long poll: the worker claims again only on NOTIFY, so the heartbeat sees the loss first.
      const worker = yield* startWorker({ queue: q, handler, concurrency: 3, pollIntervalMs: 60_000 })
      yield* eventually("the first handler runs", Effect.sync(() => counts.calls === 1), 5_000)
      clock.advance(10_000)
      assert.strictEqual((yield* queue.sweep).returned, 1)
      const started = harness.heartbeatsStarted
      yield* eventually("a heartbeat found it lost", Effect.sync(() => harness.heartbeatsEnded > started), 5_000)
      // Any NOTIFY of the queue: the producer claims the run again while its old handler still runs.
      yield* queue.send(runInput(q, { payload: { kind: "other" } }))
      yield* eventually("completed by the new claim", Effect.map(readRun(id), (row) => row.status === "completed"), 15_000)
      yield* worker.stop
      assert.deepStrictEqual({ calls: counts.calls, maxRunning: counts.maxRunning }, { calls: 2, maxRunning: 1 })
    }))

  it.effect("a run lost twice while its first handler is still ending: the third claim waits for that handler too", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("lost-twice")
      const { id } = yield* queue.send(runInput(q, { payload: { kind: "x" } }))
      const { handler, counts } = countingHandler(Effect.uninterruptible(Effect.sleep(3_000)))
      const worker = yield* startWorker({ queue: q, handler, concurrency: 3, pollIntervalMs: 60_000 })
      yield* eventually("the first handler runs", Effect.sync(() => counts.calls === 1), 5_000)
      for (let loss = 0; loss < 2; loss++) {
        // The lease runs out; a sweep returns the run; a heartbeat finds this process's claim lost.
        clock.advance(10_000)
        assert.strictEqual((yield* queue.sweep).returned, 1)
        const started = harness.heartbeatsStarted
        yield* eventually("a heartbeat found it lost", Effect.sync(() => harness.heartbeatsEnded > started), 5_000)
        // Any NOTIFY: the producer claims the run again. The other run must be settled before the clock
        // moves again, or the next sweep would take it back too.
        const other = yield* queue.send(runInput(q, { payload: { kind: "other" } }))
        yield* eventually("claimed again", Effect.map(readRun(id), (row) => row.status === "claimed" && row.attempts === loss + 1), 5_000)
        yield* eventually("the other run settled", Effect.map(readRun(other.id), (row) => row.status === "completed"), 5_000)
      }
      yield* eventually("completed", Effect.map(readRun(id), (row) => row.status === "completed"), 15_000)
      yield* worker.stop
      assert.deepStrictEqual({ calls: counts.calls, maxRunning: counts.maxRunning }, { calls: 2, maxRunning: 1 })
    }))
})
