import { assert, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { auditConversations, installClaimAudit } from "../support/claimAudit.ts"
import { freshQueue, movableClock, runInput, runsTestLayer } from "../support/runsHarness.ts"
import { exitWithin, startService } from "../support/serviceProcess.ts"

const clock = movableClock()

layer(runsTestLayer(clock), { excludeTestServices: true })("RunsQueue across processes", (it) => {
  it.effect("N runs claimed by M claimers in each of two processes are each completed exactly once", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use, url } = yield* Database
      yield* installClaimAudit
      yield* use("test.handled", (sql) =>
        sql`create table handled (run_id bigint not null, claimant text not null, at timestamptz default clock_timestamp());
            create table start_gate (opened boolean)`.simple())
      const q = freshQueue("processes")
      // 200 runs without a conversation and 20 conversations of 10 runs, interleaved.
      const inputs = Array.from({ length: 400 }, (_, i) =>
        i % 2 === 0 ? runInput(q, { payload: { i } }) : runInput(q, { agentId: "a", conversationId: `conv-${i % 40}`, payload: { i } }))
      const sent = yield* queue.sendMany(inputs)
      const env = { TEST_DATABASE_URL: Redacted.value(url), QUEUE: q, CLAIMERS: "4" }
      const workers = [startService("test/support/claimWorkerProcess.ts", env), startService("test/support/claimWorkerProcess.ts", env)]
      yield* Effect.promise(() => Promise.all(workers.map((worker) => worker.waitFor(/ready/, 60_000))))
      yield* use("test.openGate", (sql) => sql`insert into start_gate values (true)`)
      const exits = yield* Effect.promise(() => Promise.all(workers.map((worker) => exitWithin(worker, 90_000))))
      exits.forEach((exit, i) => assert.deepStrictEqual(exit, { code: 0, signal: null }, workers[i]!.output()))
      const handledCounts = workers.map((worker) => Number(/handled (\d+)/.exec(worker.output())?.[1]))
      assert.strictEqual(handledCounts[0]! + handledCounts[1]!, sent.length)

      const [check] = yield* use("test.check", (sql) =>
        sql<Array<{ runs: number; completed: number; handled: number; distinct_handled: number; claimants: number }>>`
          select (select count(*)::int from runs where queue = ${q}) as runs,
                 (select count(*)::int from runs where queue = ${q} and status = 'completed') as completed,
                 (select count(*)::int from handled) as handled,
                 (select count(distinct run_id)::int from handled) as distinct_handled,
                 (select count(distinct claimant)::int from handled) as claimants`)
      assert.deepStrictEqual(check, { runs: 400, completed: 400, handled: 400, distinct_handled: 400, claimants: 2 })
      const [order] = yield* use("test.order", (sql) =>
        sql<Array<{ out_of_order: number }>>`
          select count(*)::int as out_of_order from (
            select id < lag(id) over (partition by conversation_id order by completed_at, id) as early
              from runs where queue = ${q} and conversation_id is not null) s
           where early`)
      assert.strictEqual(order!.out_of_order, 0, "a conversation's runs completed out of id order")
      const audit = yield* auditConversations
      assert.deepStrictEqual(audit.problems, [])
      assert.strictEqual(audit.claims, 200)
    }))
})
