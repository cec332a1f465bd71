/**
 * The work loop in two OS processes on one database, with conversation locks: every run handled and
 * completed exactly once, and no conversation ever handled by two handlers at once, whichever process
 * ran them (audited from the database's own clock and a trigger on the runs table).
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { auditConversations, installClaimAudit } from "../support/claimAudit.ts"
import { freshQueue, movableClock, runInput, runsTestLayer } from "../support/runsHarness.ts"
import { exitWithin, startService } from "../support/serviceProcess.ts"

layer(runsTestLayer(movableClock()), { excludeTestServices: true })("RunWorker across processes", (it) => {
  it.effect("two processes of 4 handlers each: every run once, one handler per conversation at a time, in enqueue order", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use, url } = yield* Database
      yield* installClaimAudit
      yield* use("test.handled", (sql) =>
        sql`create table handled (run_id bigint not null, conversation text, process text not null, lock_pid int,
                                  started_at timestamptz not null, ended_at timestamptz not null);
            create table start_gate (opened boolean)`.simple())
      const q = freshQueue("work-loops")
      // 100 runs without a conversation and 10 conversations of 10 runs, interleaved.
      const inputs = Array.from({ length: 200 }, (_, i) =>
        i % 2 === 0 ? runInput(q, { payload: { i } }) : runInput(q, { agentId: "a", conversationId: `conv-${i % 20}`, payload: { i } }))
      const sent = yield* queue.sendMany(inputs)
      const env = (label: string) => ({ TEST_DATABASE_URL: Redacted.value(url), QUEUE: q, CONCURRENCY: "4", LABEL: label })
      const workers = [startService("test/support/workLoopProcess.ts", env("one")), startService("test/support/workLoopProcess.ts", env("two"))]
      yield* Effect.promise(() => Promise.all(workers.map((worker) => worker.waitFor(/ready/, 60_000))))
      yield* use("test.openGate", (sql) => sql`insert into start_gate values (true)`)
      const exits = yield* Effect.promise(() => Promise.all(workers.map((worker) => exitWithin(worker, 120_000))))
      exits.forEach((exit, i) => assert.deepStrictEqual(exit, { code: 0, signal: null }, workers[i]!.output()))

      const [check] = yield* use("test.check", (sql) =>
        sql<Array<{ completed: number; handled: number; distinct_handled: number; processes: number; unlocked: number }>>`
          select (select count(*)::int from runs where queue = ${q} and status = 'completed') as completed,
                 (select count(*)::int from handled) as handled,
                 (select count(distinct run_id)::int from handled) as distinct_handled,
                 (select count(distinct process)::int from handled) as processes,
                 (select count(*)::int from handled where conversation is not null and lock_pid is null) as unlocked`)
      assert.deepStrictEqual(check, { completed: sent.length, handled: sent.length, distinct_handled: sent.length, processes: 2, unlocked: 0 })
      const overlaps = yield* use("test.overlaps", (sql) =>
        sql<Array<{ a: string; b: string }>>`
          select x.run_id::text as a, y.run_id::text as b from handled x join handled y
            on x.conversation = y.conversation and x.run_id < y.run_id
           and x.started_at < y.ended_at and y.started_at < x.ended_at`)
      assert.deepStrictEqual([...overlaps], [], "two runs of one conversation were handled at once")
      const [order] = yield* use("test.order", (sql) =>
        sql<Array<{ out_of_order: number }>>`
          select count(*)::int as out_of_order from (
            select run_id < lag(run_id) over (partition by conversation order by started_at) as early
              from handled where conversation is not null) s where early`)
      assert.strictEqual(order!.out_of_order, 0, "a conversation's runs were handled out of enqueue order")
      const audit = yield* auditConversations
      assert.deepStrictEqual(audit.problems, [])
    }))
})
