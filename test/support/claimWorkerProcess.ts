/**
 * A separate process that claims and completes runs, for RunsQueue.process.test.ts: CLAIMERS fibers
 * share one RunsQueue (one claimant id) and loop claim -> record in `handled` -> completeMany until
 * the queue QUEUE has nothing pending or claimed. It prints `ready` and starts only once the test has
 * put a row in `start_gate`, so both processes race from the same moment whatever their startup took.
 * Prints `handled <n>` and exits 0.
 */
import { Effect, Layer, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { awaitStartGate } from "./startGate.ts"

const url = process.env["TEST_DATABASE_URL"] ?? ""
const queueName = process.env["QUEUE"] ?? ""
const claimers = Number(process.env["CLAIMERS"] ?? "1")

const program = Effect.gen(function*() {
  const queue = yield* RunsQueue
  const { use } = yield* Database
  let handled = 0
  const unfinished = use("worker.unfinished", (sql) =>
    sql<Array<{ n: number }>>`
      select count(*)::int as n from runs where queue = ${queueName} and status in ('pending', 'claimed')`)
  const claimer = Effect.gen(function*() {
    for (;;) {
      const runs = yield* queue.claim(queueName, { limit: 5 })
      if (runs.length === 0) {
        const [row] = yield* unfinished
        if (row!.n === 0) return
        continue
      }
      const ids = runs.map((run) => run.id)
      yield* use("worker.handled", (sql) =>
        sql`insert into handled (run_id, claimant) select unnest(${ids}::bigint[]), ${queue.claimantId}`)
      const outcome = yield* queue.completeMany(runs)
      if (outcome.lost.length > 0) return yield* Effect.die(new Error(`lost runs ${outcome.lost.join(", ")}`))
      handled += runs.length
    }
  })
  yield* awaitStartGate(use)
  yield* Effect.all(Array.from({ length: claimers }, () => claimer), { concurrency: "unbounded" })
  process.stdout.write(`handled ${handled}\n`)
})

Effect.runPromise(
  program.pipe(
    Effect.provide(RunsQueue.layerWith({}).pipe(
      Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: claimers + 1 }))
    ))
  )
).then(
  () => (process.exitCode = 0),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
