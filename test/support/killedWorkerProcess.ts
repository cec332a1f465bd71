/**
 * A separate process running the real work loop (RunWorker.start) over the queue QUEUE, for
 * RunWorker.killed.process.test.ts, which SIGKILLs it mid-run. Its handler prints
 * `started <run id> attempts <n> claimant <claimant id>` and then never finishes, so the run stays
 * claimed until the process dies. Concurrency 1: it holds at most one run.
 *
 * Its RunsQueue's clock stands still at NOW_MS (the test's movable clock when it started this process),
 * with LEASE_MS and HEARTBEAT_MS, so the lease it takes ends at exactly NOW_MS + LEASE_MS.
 */
import { Effect, Layer, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"

const url = process.env["TEST_DATABASE_URL"] ?? ""
const queueName = process.env["QUEUE"] ?? ""
const nowMs = Number(process.env["NOW_MS"])
const leaseMs = Number(process.env["LEASE_MS"])
const heartbeatMs = Number(process.env["HEARTBEAT_MS"])

const program = Effect.gen(function*() {
  const worker = yield* RunWorker
  const queue = yield* RunsQueue
  yield* worker.start({
    queue: queueName,
    concurrency: 1,
    handler: ({ run }) =>
      Effect.sync(() => process.stdout.write(`started ${run.id} attempts ${run.attempts} claimant ${queue.claimantId}\n`)).pipe(
        Effect.andThen(Effect.never)
      )
  })
  return yield* Effect.never
}).pipe(Effect.scoped)

const layer = RunWorker.layer.pipe(
  Layer.provideMerge(RunsQueue.layerWith({ now: () => new Date(nowMs), leaseMs, heartbeatMs })),
  Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 3 }))
)

Effect.runPromise(program.pipe(Effect.provide(layer))).then(
  () => (process.exitCode = 0),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
