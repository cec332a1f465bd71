/**
 * The start gate of the tests that race worker processes: each child prints `ready`, then waits for
 * the test to put a row in `start_gate`, so the processes start working from the same moment whatever
 * their start-up took. Polls every 20 ms, for at most a minute.
 */
import { Effect } from "effect"
import type { Database } from "../../src/db/Database.ts"

export const awaitStartGate = (use: Database["Service"]["use"]) =>
  Effect.gen(function*() {
    process.stdout.write("ready\n")
    const deadline = Date.now() + 60_000
    for (;;) {
      const [gate] = yield* use("worker.gate", (sql) => sql<Array<{ open: boolean }>>`select exists (select 1 from start_gate) as open`)
      if (gate!.open) return
      if (Date.now() > deadline) return yield* Effect.die(new Error("start_gate never opened"))
      yield* Effect.sleep(20)
    }
  })
