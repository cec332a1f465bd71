import { assert, layer } from "@effect/vitest"
import { Deferred, Effect, Layer } from "effect"
import { PrometheusMetrics } from "effect/observability"
import { Database } from "../../src/db/Database.ts"
import { DatabaseError } from "../../src/db/DatabaseError.ts"
import { InvalidRunsArgument } from "../../src/runs/runErrors.ts"
import { RunWorker, type RunHandlerInput } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { eventually } from "../support/lockHarness.ts"
import { freshQueue, readRun, runInput, startWorker } from "../support/runsHarness.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

/**
 * The real RunsQueue seen through the harness: claims are counted (to show the loop claims only when it
 * has reason to), and the next `completeFaults` statements that complete runs (with a claim or alone)
 * fail as a lost connection would.
 */
let claims = 0
let completeFaults = 0
/** Statements that completed runs: with a claim, and alone. */
const completing = { withClaim: 0, alone: 0 }
/**
 * When set, the next claim statement that completes runs waits for it before its SQL (then it is
 * unset), and `held` counts the statements that reached it.
 */
const completingHold = { gate: undefined as Deferred.Deferred<void> | undefined, held: 0 }
const CountingQueue = Layer.effect(
  RunsQueue,
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    return RunsQueue.of({
      ...queue,
      claim: (q, options) => Effect.suspend(() => (claims++, queue.claim(q, options))),
      completeManyAndClaim: (runs, q, options) =>
        Effect.suspend(() => {
          if (options.limit > 0) claims++
          if (runs.length > 0) completing.withClaim++
          const gate = runs.length > 0 ? completingHold.gate : undefined
          if (gate !== undefined) {
            completingHold.gate = undefined
            completingHold.held++
            return Effect.andThen(Deferred.await(gate), queue.completeManyAndClaim(runs, q, options))
          }
          if (completeFaults === 0 || runs.length === 0) return queue.completeManyAndClaim(runs, q, options)
          completeFaults--
          return Effect.fail(new DatabaseError({ operation: "RunsQueue.completeManyAndClaim", message: "injected", retryable: true, cause: null }))
        }),
      completeMany: (runs) =>
        Effect.suspend(() => {
          if (runs.length > 0) completing.alone++
          if (completeFaults === 0 || runs.length === 0) return queue.completeMany(runs)
          completeFaults--
          return Effect.fail(new DatabaseError({ operation: "RunsQueue.complete", message: "injected", retryable: true, cause: null }))
        })
    })
  })
).pipe(Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 3_000, heartbeatMs: 1_000 })))

const TestLayer = RunWorker.layer.pipe(Layer.provideMerge(CountingQueue), Layer.provideMerge(testDatabaseLayer()))

const statuses = (q: string) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const rows = yield* use("test.statuses", (sql) =>
      sql<Array<{ status: string; n: number }>>`select status, count(*)::int as n from runs where queue = ${q} group by status`)
    return Object.fromEntries(rows.map((row) => [row.status, row.n]))
  })


layer(TestLayer, { excludeTestServices: true })("RunWorker", (it) => {
  it.effect("processes every run with at most `concurrency` handlers at once, claiming in batches", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("work")
      yield* queue.sendMany(Array.from({ length: 60 }, (_, i) => runInput(q, { payload: { i } })))
      let running = 0
      let most = 0
      const seen = new Set<number>()
      claims = 0
      const worker = yield* startWorker({
        queue: q,
        concurrency: 4,
        handler: ({ run }: RunHandlerInput) =>
          Effect.gen(function*() {
            running++
            most = Math.max(most, running)
            seen.add(run.payload["i"] as number)
            yield* Effect.yieldNow
            running--
          })
      })
      yield* eventually("all 60 runs completed", Effect.map(statuses(q), (s) => s["completed"] === 60), 15_000)
      yield* worker.stop
      assert.strictEqual(seen.size, 60)
      assert.isAtMost(most, 4)
      // 60 runs in claims of up to 4 free slots: far fewer claims than runs, and no spinning while idle.
      assert.isBelow(claims, 60)
    }))

  it.effect("a failing handler spends the attempt and stores its error; a Defer spends none", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("fail")
      const [failing, deferred] = yield* queue.sendMany([
        runInput(q, { payload: { kind: "fail" }, retryDelaySeconds: 3_600 }),
        runInput(q, { payload: { kind: "defer" } })
      ])
      const worker = yield* startWorker({
        queue: q,
        handler: ({ run }: RunHandlerInput) =>
          run.payload["kind"] === "fail"
            ? Effect.fail(new Error("model refused"))
            : Effect.succeed({ _tag: "Defer", delayMs: 3_600_000 } as const)
      })
      yield* eventually("both settled", Effect.map(statuses(q), (s) => s["pending"] === 2), 10_000)
      yield* worker.stop
      const failed = yield* readRun(failing!.id)
      assert.strictEqual(failed.attempts, 1)
      assert.strictEqual(failed.error_message, "Error: model refused")
      const later = yield* readRun(deferred!.id)
      assert.strictEqual(later.attempts, 0)
      assert.isNull(later.error_message)
    }))

  it.effect("counts claims, completions, failed attempts, deferrals and the enqueue-to-start latency per queue in /metrics' text", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("metrics")
      yield* queue.sendMany([
        runInput(q, { payload: { kind: "done" } }),
        runInput(q, { payload: { kind: "done" } }),
        runInput(q, { payload: { kind: "fail" }, retryDelaySeconds: 3_600 }),
        runInput(q, { payload: { kind: "defer" } })
      ])
      const worker = yield* startWorker({
        queue: q,
        handler: ({ run }: RunHandlerInput) =>
          run.payload["kind"] === "fail"
            ? Effect.fail(new Error("model refused"))
            : run.payload["kind"] === "defer"
            ? Effect.succeed({ _tag: "Defer", delayMs: 3_600_000 } as const)
            : Effect.void
      })
      yield* eventually("all settled", Effect.map(statuses(q), (s) => s["completed"] === 2 && s["pending"] === 2), 10_000)
      yield* worker.stop
      const text = yield* PrometheusMetrics.format()
      const sample = (name: string, labels: string) => {
        const line = text.split("\n").find((l) => l.startsWith(`${name}{`) && l.includes(labels) && l.includes(`queue="${q}"`))
        return line === undefined ? undefined : Number(line.slice(line.lastIndexOf(" ") + 1))
      }
      assert.strictEqual(sample("runlane_runs_claimed_total", ""), 4)
      assert.strictEqual(sample("runlane_runs_completed_total", ""), 2)
      assert.strictEqual(sample("runlane_runs_failed_attempts_total", ""), 1)
      assert.strictEqual(sample("runlane_runs_deferred_total", `reason="handler"`), 1)
      assert.strictEqual(sample("runlane_run_start_latency_seconds_count", ""), 4, "every first attempt's start observed")
      assert.isAtLeast(sample("runlane_run_start_latency_seconds_sum", "")!, 0)
    }))

  it.effect("completions ride with the claim in a worker of 4 slots; 20 finishing together are settled in their own statement", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      for (const [concurrency, together] of [[4, true], [20, false]] as const) {
        const q = freshQueue(`completing-${concurrency}`)
        yield* queue.sendMany(Array.from({ length: 60 }, () => runInput(q)))
        completing.withClaim = 0
        completing.alone = 0
        const worker = yield* startWorker({ queue: q, concurrency, handler: () => Effect.void })
        yield* eventually("all completed", Effect.map(statuses(q), (s) => s["completed"] === 60), 10_000)
        yield* worker.stop
        // Four slots: every completion rides with a claim. Twenty: twenty runs finishing together are
        // more than 16 to complete, so at least those are settled apart (a few may still ride along).
        if (together) assert.deepStrictEqual(completing, { withClaim: completing.withClaim, alone: 0 }, `concurrency ${concurrency}`)
        assert.isAbove(together ? completing.withClaim : completing.alone, 0, `concurrency ${concurrency}`)
      }
    }))

  it.effect("stopping a loop with nothing to claim does not wait for its poll interval", () =>
    Effect.gen(function*() {
      const q = freshQueue("lanes-stop")
      const before = claims
      const worker = yield* startWorker({ queue: q, concurrency: 16, pollIntervalMs: 60_000, handler: () => Effect.void })
      yield* eventually("it claimed once", Effect.sync(() => claims >= before + 1), 5_000)
      const started = Date.now()
      yield* worker.stop
      assert.isBelow(Date.now() - started, 5_000, "stopped within 5 s, not the 60 s poll")
    }))

  it.effect("a loop of 16 slots never has more runs claimed than slots: a statement completing 16 holds their slots until it commits, whatever wakes the loop", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("lanes-held")
      const latch = yield* Deferred.make<void>()
      const secondLatch = yield* Deferred.make<void>()
      const claimedNow = Effect.map(statuses(q), (s) => s["claimed"] ?? 0)
      yield* queue.sendMany(Array.from({ length: 16 }, () => runInput(q)))
      let running = 0
      const worker = yield* startWorker({
        queue: q,
        concurrency: 16,
        pollIntervalMs: 500,
        handler: ({ run }: RunHandlerInput) =>
          Effect.sync(() => void running++).pipe(
            Effect.andThen(Deferred.await(run.payload["kind"] === "second" ? secondLatch : latch)),
            Effect.ensuring(Effect.sync(() => void running--))
          )
      })
      yield* eventually("16 handlers running", Effect.sync(() => running === 16), 5_000)
      // The 16 end together; the statement that completes them (all or the first few) is held.
      const gate = yield* Deferred.make<void>()
      completingHold.gate = gate
      const heldBefore = completingHold.held
      yield* Deferred.succeed(latch, undefined)
      yield* eventually("the completing statement held", Effect.sync(() => completingHold.held > heldBefore), 5_000)
      // New runs (whose handlers wait) wake the loop: nothing may claim them while the 16 are still
      // claimed. Polled for 2 s: a second statement would claim within milliseconds.
      yield* queue.sendMany(Array.from({ length: 16 }, () => runInput(q, { payload: { kind: "second" } })))
      let mostClaimed = 0
      for (let poll = 0; poll < 40; poll++) {
        mostClaimed = Math.max(mostClaimed, yield* claimedNow)
        yield* Effect.sleep(50)
      }
      yield* Deferred.succeed(gate, undefined)
      yield* Deferred.succeed(secondLatch, undefined)
      yield* eventually("all completed", Effect.map(statuses(q), (s) => s["completed"] === 32), 10_000)
      yield* worker.stop
      assert.strictEqual(mostClaimed, 16, "runs claimed while the completing statement was held")
    }))

  it.effect("a settle the database refused is retried until the runs are completed", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("retry-settle")
      yield* queue.sendMany(Array.from({ length: 3 }, () => runInput(q)))
      completeFaults = 2
      const worker = yield* startWorker({ queue: q, handler: () => Effect.void })
      yield* eventually("all completed after two refused settles", Effect.map(statuses(q), (s) => s["completed"] === 3), 10_000)
      yield* worker.stop
      assert.strictEqual(completeFaults, 0)
    }))

  it.effect("wakes on NOTIFY rather than waiting for its poll", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("notify")
      const worker = yield* startWorker({ queue: q, pollIntervalMs: 600_000, handler: () => Effect.void })
      // Let the worker make its first (empty) claim and go to sleep on the ten-minute poll.
      claims = 0
      yield* eventually("the first claim", Effect.sync(() => claims > 0))
      const { id } = yield* queue.send(runInput(q))
      yield* eventually("the run completed long before the poll", Effect.map(readRun(id), (r) => r.status === "completed"))
      yield* worker.stop
    }))

  it.effect("stopping waits for running handlers, then interrupts the rest and releases their runs", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stop")
      const [quick, stuck] = yield* queue.sendMany([runInput(q, { payload: { kind: "quick" } }), runInput(q, { payload: { kind: "stuck" } })])
      let started = 0
      const worker = yield* startWorker({
        queue: q,
        stopTimeoutMs: 300,
        handler: ({ run }: RunHandlerInput) =>
          Effect.gen(function*() {
            started++
            if (run.payload["kind"] === "stuck") return yield* Effect.never
            yield* Effect.sleep(50)
          })
      })
      yield* eventually("both handlers running", Effect.sync(() => started === 2))
      yield* worker.stop
      assert.strictEqual((yield* readRun(quick!.id)).status, "completed")
      const released = yield* readRun(stuck!.id)
      assert.strictEqual(released.status, "pending")
      assert.strictEqual(released.attempts, 0)
      assert.isNull(released.claimed_by)
    }))

  it.effect("a run cancelled while its handler runs: the handler is interrupted and the run ends cancelled", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("cancel")
      const { id } = yield* queue.send(runInput(q))
      let interrupted = false
      const worker = yield* startWorker({
        queue: q,
        handler: () => Effect.never.pipe(Effect.onInterrupt(() => Effect.sync(() => (interrupted = true))))
      })
      yield* eventually("claimed", Effect.map(readRun(id), (r) => r.status === "claimed"))
      assert.deepStrictEqual(yield* queue.cancel(id), { _tag: "CancelRequested" })
      // The next heartbeat (every second here) ends it.
      yield* eventually("cancelled and the handler interrupted", Effect.map(readRun(id), (r) => r.status === "cancelled" && interrupted))
      yield* worker.stop
    }))

  it.effect("refuses a concurrency outside 1-1,000, naming it", () =>
    Effect.gen(function*() {
      const worker = yield* RunWorker
      const error = yield* Effect.flip(Effect.scoped(worker.start({ queue: "q", concurrency: 0, handler: () => Effect.void })))
      assert.instanceOf(error, InvalidRunsArgument)
      assert.strictEqual((error as InvalidRunsArgument).argument, "concurrency")
    }))
})
