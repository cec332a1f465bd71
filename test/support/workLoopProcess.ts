/**
 * A separate process running the real work loop with conversation locks, for
 * RunWorker.process.test.ts: RunWorker over QUEUE with CONCURRENCY handlers. Each handler records in
 * `handled` its run, its process and, from the database's clock, when it started and ended (a few ms of
 * "work" in between), so the test can check in the database that no two runs of a conversation were
 * ever handled at once, whichever process handled them. Prints `ready`, starts once `start_gate` has a
 * row, and exits 0 once QUEUE has nothing pending or claimed (stopping the loop cleanly first).
 */
import { ConfigProvider, Effect, Exit, Layer, Redacted, Scope } from "effect"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { awaitStartGate } from "./startGate.ts"

const url = process.env["TEST_DATABASE_URL"] ?? ""
const queueName = process.env["QUEUE"] ?? ""
const concurrency = Number(process.env["CONCURRENCY"] ?? "4")
const label = process.env["LABEL"] ?? "worker"

const program = Effect.gen(function*() {
  const { use } = yield* Database
  const worker = yield* RunWorker
  yield* awaitStartGate(use)
  const deadline = Date.now() + 120_000
  let handled = 0
  const scope = yield* Scope.make()
  yield* worker.start({
    queue: queueName,
    concurrency,
    pollIntervalMs: 100,
    handler: ({ run, lock }) =>
      use("worker.handled", (sql) =>
        sql`insert into handled (run_id, conversation, process, lock_pid, started_at, ended_at)
            select ${run.id}, ${run.conversationId}, ${label}, ${lock?.backendPid ?? null}, clock_timestamp(),
                   (select clock_timestamp() from pg_sleep(0.003))`).pipe(Effect.andThen(Effect.sync(() => void handled++)))
  }).pipe(Scope.provide(scope))
  for (;;) {
    const [row] = yield* use("worker.unfinished", (sql) =>
      sql<Array<{ n: number }>>`select count(*)::int as n from runs where queue = ${queueName} and status in ('pending', 'claimed')`)
    if (row!.n === 0) break
    if (Date.now() > deadline) return yield* Effect.die(new Error("runs left unfinished"))
    yield* Effect.sleep(50)
  }
  yield* Scope.close(scope, Exit.void)
  process.stdout.write(`handled ${handled}\n`)
})

const layer = RunWorker.layer.pipe(
  Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 10_000, heartbeatMs: 2_000 })),
  Layer.provideMerge(ConversationLocks.layerWith({ cap: 4, keepaliveMs: 1_000 })),
  Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 10 })),
  // Conversations kept a minute: handing them between the processes is what is under test.
  Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_CONVERSATION_IDLE_MS: "60000" })))
)

Effect.runPromise(Effect.scoped(program).pipe(Effect.provide(layer))).then(
  () => (process.exitCode = 0),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
