/**
 * The work loop `npm start` runs next to its HTTP API, with the demo handler (src/demo/demoHandler.ts),
 * and the retention pass.
 *
 * - `RUNLANE_WORKER`: `demo` (default) runs the loop; `off` serves HTTP only (a deployment whose own
 *   workers use the library, or a second API process).
 * - `RUNLANE_WORKER_QUEUE` (default `demo`): the queue it works. Not `default`: a producer's runs in a
 *   queue of its own are never completed by the demo handler by accident.
 * - `RUNLANE_WORKER_CONCURRENCY` (default 10, 1 to 1,000): runs in flight at once. Conversations kept
 *   between runs count against the lock cap, not against this.
 *
 * Built after the HTTP server, so it is stopped before the server drains: its in-flight handlers still
 * upload their transcripts through it.
 */
import { Config, Effect, Layer, Schema } from "effect"
import { HttpServer } from "effect/http"
import { makeDemoHandler } from "./demo/demoHandler.ts"
import { InvalidRunsArgument } from "./runs/runErrors.ts"
import { RunWorker, workerDefaults } from "./runs/RunWorker.ts"

/**
 * Stopping waits this long for running handlers (then releases their runs): a third of the 30 s most
 * supervisors allow between SIGTERM and SIGKILL, leaving the HTTP drain and the database stop the rest.
 */
export const serviceWorkerDefaults = { queue: "demo", concurrency: workerDefaults.concurrency, stopTimeoutMs: 10_000 } as const

const WorkerMode = Schema.Literals(["demo", "off"])

export const serviceWorkerLayer = Layer.effectDiscard(Effect.gen(function*() {
  const mode = yield* Config.schema(WorkerMode, "RUNLANE_WORKER").pipe(Config.withDefault("demo" as const))
  if (mode === "off") return yield* Effect.logInfo("Run worker: off (RUNLANE_WORKER=off)")
  const queue = yield* Config.String("RUNLANE_WORKER_QUEUE").pipe(Config.withDefault(serviceWorkerDefaults.queue))
  const concurrency = yield* Config.Int("RUNLANE_WORKER_CONCURRENCY").pipe(Config.withDefault(serviceWorkerDefaults.concurrency))
  if (queue.length === 0) {
    return yield* new InvalidRunsArgument({ argument: "RUNLANE_WORKER_QUEUE", message: "must not be empty" })
  }
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 1_000) {
    return yield* new InvalidRunsArgument({ argument: "RUNLANE_WORKER_CONCURRENCY", message: `must be a whole number from 1 to 1000, got ${concurrency}` })
  }
  const baseUrl = HttpServer.formatAddress((yield* HttpServer.HttpServer).address)
  const worker = yield* RunWorker
  yield* worker.start({ queue, concurrency, stopTimeoutMs: serviceWorkerDefaults.stopTimeoutMs, handler: makeDemoHandler(baseUrl) })
  yield* Effect.logInfo(`Run worker: the demo handler works queue "${queue}", ${concurrency} at a time`)
}))
