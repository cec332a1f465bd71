/**
 * A worker killed mid-run: the real work loop runs in a child process (support/killedWorkerProcess.ts)
 * whose handler never finishes; the test SIGKILLs it once the handler has started. Nothing of the child
 * runs after that (no release, no settle), so the claim must survive in the database until its lease
 * ends, and then the sweep takes it back with the lost attempt counted: pending again while attempts
 * remain, `failed` at max_attempts, so a run that kills its worker every time cannot loop forever.
 *
 * The child's clock stands still at the test's movable clock when it was started; the test moves its
 * own clock past the lease instead of waiting for it.
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Layer, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import type { RunHandlerInput } from "../../src/runs/RunWorker.ts"
import { RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { leaseExpiredMessage } from "../../src/runs/sql/runSweepExpiredLeases.ts"
import { eventually } from "../support/lockHarness.ts"
import { freshQueue, movableClock, readRun, runInput, runsTestLayer, startWorker } from "../support/runsHarness.ts"
import { exitWithin, startService } from "../support/serviceProcess.ts"

const clock = movableClock()
const leaseMs = 60_000
const heartbeatMs = 20_000

const TestLayer = RunWorker.layer.pipe(Layer.provideMerge(runsTestLayer(clock, { leaseMs, heartbeatMs })))

const nothingSwept = { returned: 0, failed: 0, cancelled: 0 }

/**
 * Starts the child worker over `queue`, waits until its handler has started a run, SIGKILLs it and waits
 * for it to be gone. The child is killed when the test's scope closes, whatever happened before.
 */
const killMidRun = (queue: string) =>
  Effect.gen(function*() {
    const { url } = yield* Database
    const childNow = clock.now()
    const child = yield* Effect.acquireRelease(
      Effect.sync(() =>
        startService("test/support/killedWorkerProcess.ts", {
          TEST_DATABASE_URL: Redacted.value(url),
          QUEUE: queue,
          NOW_MS: String(childNow.getTime()),
          LEASE_MS: String(leaseMs),
          HEARTBEAT_MS: String(heartbeatMs)
        })
      ),
      (child) =>
        child.done()
          ? Effect.void
          : Effect.tryPromise(() => (child.signal("SIGKILL"), exitWithin(child, 10_000))).pipe(Effect.ignore)
    )
    const started = yield* Effect.promise(() => child.waitFor(/started (\d+) attempts (\d+) claimant (\S+)\n/, 60_000))
    child.signal("SIGKILL")
    const exit = yield* Effect.promise(() => exitWithin(child, 10_000))
    assert.deepStrictEqual(exit, { code: null, signal: "SIGKILL" }, child.output())
    // Exactly one run started: the handler never finished, so the child (concurrency 1) claimed no other.
    assert.strictEqual(child.output().match(/started /g)?.length, 1, child.output())
    return {
      runId: Number(started[1]),
      attempts: Number(started[2]),
      claimant: started[3]!,
      leaseExpiresAt: new Date(childNow.getTime() + leaseMs)
    }
  })

/** Moves the test's clock to `at` exactly. */
const moveClockTo = (at: Date) => clock.advance(at.getTime() - clock.now().getTime())

layer(TestLayer, { excludeTestServices: true })("RunWorker killed mid-run (SIGKILL of its process)", (it) => {
  it.effect("leaves its claim, which the sweep returns to pending with the lost attempt counted; it then completes once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("killed")
      const [first, second] = yield* queue.sendMany([runInput(q, { payload: { n: 1 } }), runInput(q, { payload: { n: 2 } })])
      const killed = yield* killMidRun(q)
      assert.strictEqual(killed.runId, first!.id, "the child started the queue's first run")
      assert.strictEqual(killed.attempts, 0)
      assert.notStrictEqual(killed.claimant, queue.claimantId, "the child is a claimant of its own")

      // The claim survived the crash: still claimed by the dead claimant, its lease where the child set it.
      const claimed = yield* readRun(first!.id)
      assert.deepStrictEqual(
        { status: claimed.status, attempts: claimed.attempts, claimedBy: claimed.claimed_by, error: claimed.error_message },
        { status: "claimed", attempts: 0, claimedBy: killed.claimant, error: null }
      )
      assert.strictEqual(claimed.lease_expires_at?.getTime(), killed.leaseExpiresAt.getTime())
      const untouched = yield* readRun(second!.id)
      assert.deepStrictEqual(
        { status: untouched.status, attempts: untouched.attempts, claimedBy: untouched.claimed_by },
        { status: "pending", attempts: 0, claimedBy: null }
      )

      // Before the lease ends (up to its very last instant) the sweep leaves the claim alone.
      assert.deepStrictEqual(yield* queue.sweep, nothingSwept)
      moveClockTo(killed.leaseExpiresAt)
      assert.deepStrictEqual(yield* queue.sweep, nothingSwept)
      assert.strictEqual((yield* readRun(first!.id)).status, "claimed")

      clock.advance(1)
      assert.deepStrictEqual(yield* queue.sweep, { returned: 1, failed: 0, cancelled: 0 })
      const swept = yield* readRun(first!.id)
      assert.deepStrictEqual(
        {
          status: swept.status,
          attempts: swept.attempts,
          claimedBy: swept.claimed_by,
          lease: swept.lease_expires_at,
          completedAt: swept.completed_at,
          error: swept.error_message
        },
        { status: "pending", attempts: 1, claimedBy: null, lease: null, completedAt: null, error: leaseExpiredMessage }
      )
      assert.match(swept.error_message ?? "", /lease expired/)
      // Due at once and in its old place: run_at unchanged.
      assert.strictEqual(swept.run_at.getTime(), claimed.run_at.getTime())
      const state = yield* queue.get(first!.id)
      assert.deepStrictEqual({ status: state.status, attempts: state.attempts, error: state.error }, {
        status: "pending",
        attempts: 1,
        error: leaseExpiredMessage
      })
      // Counted once: a second sweep finds nothing.
      assert.deepStrictEqual(yield* queue.sweep, nothingSwept)
      assert.strictEqual((yield* readRun(second!.id)).attempts, 0)

      // A live worker (this process's) claims it again, first, and completes it once.
      const handled: Array<{ readonly id: number; readonly attempts: number }> = []
      const worker = yield* startWorker({
        queue: q,
        concurrency: 1,
        handler: ({ run }: RunHandlerInput) => Effect.sync(() => void handled.push({ id: run.id, attempts: run.attempts }))
      })
      const { use } = yield* Database
      yield* eventually(
        "both runs completed",
        Effect.map(
          use("test.completed", (sql) =>
            sql<Array<{ n: number }>>`select count(*)::int as n from runs where queue = ${q} and status = 'completed'`),
          (rows) => rows[0]!.n === 2
        ),
        10_000
      )
      yield* worker.stop
      assert.deepStrictEqual(handled, [{ id: first!.id, attempts: 1 }, { id: second!.id, attempts: 0 }])
      const completed = yield* readRun(first!.id)
      assert.deepStrictEqual(
        { status: completed.status, attempts: completed.attempts, claimedBy: completed.claimed_by, completedAt: completed.completed_at },
        { status: "completed", attempts: 1, claimedBy: null, completedAt: clock.now() }
      )
    }))

  it.effect("with max_attempts 1, ends `failed` by the sweep, not pending: a run that kills its worker cannot loop", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("killed-last")
      const sent = yield* queue.send(runInput(q, { maxAttempts: 1 }))
      const killed = yield* killMidRun(q)
      assert.strictEqual(killed.runId, sent.id)
      assert.strictEqual(killed.attempts, 0)

      const claimed = yield* readRun(sent.id)
      assert.deepStrictEqual(
        { status: claimed.status, attempts: claimed.attempts, claimedBy: claimed.claimed_by },
        { status: "claimed", attempts: 0, claimedBy: killed.claimant }
      )
      assert.strictEqual(claimed.lease_expires_at?.getTime(), killed.leaseExpiresAt.getTime())
      assert.deepStrictEqual(yield* queue.sweep, nothingSwept)

      moveClockTo(new Date(killed.leaseExpiresAt.getTime() + 1))
      assert.deepStrictEqual(yield* queue.sweep, { returned: 0, failed: 1, cancelled: 0 })
      const failed = yield* readRun(sent.id)
      assert.deepStrictEqual(
        {
          status: failed.status,
          attempts: failed.attempts,
          claimedBy: failed.claimed_by,
          lease: failed.lease_expires_at,
          completedAt: failed.completed_at,
          error: failed.error_message
        },
        { status: "failed", attempts: 1, claimedBy: null, lease: null, completedAt: clock.now(), error: leaseExpiredMessage }
      )
      // The stored text says why the attempt was lost, not merely that it was.
      assert.match(failed.error_message ?? "", /^lease expired: the worker stopped heartbeating$/)
      const state = yield* queue.get(sent.id)
      assert.deepStrictEqual({ status: state.status, attempts: state.attempts, maxAttempts: state.maxAttempts, error: state.error }, {
        status: "failed",
        attempts: 1,
        maxAttempts: 1,
        error: leaseExpiredMessage
      })

      // Final: nothing claims it again, and the sweep has nothing more to do, however late.
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [])
      clock.advance(leaseMs * 10)
      assert.deepStrictEqual(yield* queue.sweep, nothingSwept)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [])
      assert.strictEqual((yield* readRun(sent.id)).status, "failed")
    }))
})
