/**
 * The claim's cost must not grow with the backlog: it reads a queue's pending runs in the order of
 * runs_claim_idx and stops at its limit. Asserted on the plan PostgreSQL chooses for the very statement
 * RunsQueue runs (runClaimAvailable, prefixed with EXPLAIN), over a backlog of 2,000 pending runs in
 * 200 conversations. A sort in the plan means every pending run of the queue is read on every claim.
 *
 * Nor may a claim pay for planning every time: planning the statement costs as much server CPU as
 * running it (0.5 ms of a 1 ms claim of 10 runs on PostgreSQL 15 here). Asserted on
 * pg_prepared_statements of the connection that ran it: a plan made once and reused (generic_plans).
 */
import { randomUUID } from "node:crypto"
import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import type { ClaimedRunRow } from "../../src/runs/sql/claimEligibility.ts"
import { runClaimAvailable } from "../../src/runs/sql/runClaimAvailable.ts"
import { runCompleteAndClaim } from "../../src/runs/sql/runCompleteAndClaim.ts"
import { freshQueue, movableClock, runInput, runsTestLayer } from "../support/runsHarness.ts"
import { explaining, indexesRead, planNodes } from "../support/statementPlan.ts"

layer(runsTestLayer(movableClock()), { excludeTestServices: true })("the claim's plan", (it) => {
  it.effect("reads pending runs in runs_claim_idx order and stops at the limit: no sort of the backlog", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql, use } = yield* Database
      const q = freshQueue("plan")
      for (let batch = 0; batch < 2; batch++) {
        yield* queue.sendMany(Array.from({ length: 1_000 }, (_, i) =>
          runInput(q, { agentId: "a", conversationId: `c-${(batch * 1_000 + i) % 200}` })))
      }
      yield* use("test.analyze", (client) => client`analyze runs`)
      const rows = yield* Effect.promise(() =>
        runClaimAvailable(explaining(sql), { queue: q, limit: 16, claimant: "plan-test", leaseMs: 60_000, now: null, claimId: randomUUID() }))
      const all = planNodes(rows)
      assert.deepStrictEqual(all.filter((node) => node["Node Type"] === "Sort").length, 0, JSON.stringify(all, null, 1))
      assert.isTrue(indexesRead(all).includes("runs_claim_idx"), JSON.stringify(all, null, 1))
    }))
})

layer(runsTestLayer(movableClock()), { excludeTestServices: true })("the claim's planning", (it) => {
  it.effect("a claim of up to 16 runs, and one that also completes, reuses one plan on a connection instead of planning each time", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql, use } = yield* Database
      const q = freshQueue("planning")
      // A backlog the statistics know of: a LIMIT given as a parameter is planned as 10% of it.
      for (let batch = 0; batch < 4; batch++) yield* queue.sendMany(Array.from({ length: 1_000 }, () => runInput(q)))
      yield* use("test.analyze", (client) => client`analyze runs`)
      const connection = yield* Effect.acquireRelease(
        Effect.promise(() => sql.reserve()),
        (reserved) => Effect.sync(() => reserved.release())
      )
      // PostgreSQL plans the first five executions of a prepared statement for their parameters, then
      // keeps one plan when it is no costlier than those were.
      for (let claim = 0; claim < 10; claim++) {
        const runs = yield* Effect.promise(() =>
          runClaimAvailable(connection, { queue: q, limit: 10, claimant: "planning-test", leaseMs: 60_000, now: null, claimId: randomUUID() }))
        assert.strictEqual(runs.length, 10)
      }
      // The work loop's statement: each call completes the previous call's runs and claims 10 more.
      let previous: ReadonlyArray<ClaimedRunRow> = yield* Effect.promise(() =>
        runClaimAvailable(connection, { queue: q, limit: 10, claimant: "planning-test", leaseMs: 60_000, now: null, claimId: randomUUID() }))
      for (let claim = 0; claim < 10; claim++) {
        const [answer] = yield* Effect.promise(() =>
          runCompleteAndClaim(connection, {
            queue: q,
            limit: 10,
            ids: previous.map((row) => Number(row.id)),
            claimTokens: previous.map((row) => row.claim_id),
            claimant: "planning-test",
            leaseMs: 60_000,
            now: null,
            claimId: randomUUID()
          }))
        assert.strictEqual(answer.completed.length, 10)
        assert.strictEqual(answer.claimed.length, 10)
        previous = answer.claimed
      }
      const statements = yield* Effect.promise(() =>
        connection<Array<{ completes: boolean; generic_plans: string; custom_plans: string }>>`
          select statement like '%completed as%' as completes, generic_plans::text, custom_plans::text
            from pg_prepared_statements
           where statement like '%candidates as%' and statement not like '%pg_prepared_statements%'
           order by 1`)
      assert.deepStrictEqual(statements.map((statement) => statement.completes), [false, true], JSON.stringify(statements))
      for (const statement of statements) assert.isAtLeast(Number(statement.generic_plans), 5, JSON.stringify(statements))
    }))
})

layer(runsTestLayer(movableClock()), { excludeTestServices: true })("the claim's cached plan", (it) => {
  it.effect("a plan cached while the table was small keeps runs_claim_idx's order once a backlog arrives", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql, use } = yield* Database
      const q = freshQueue("cached")
      // No autoanalyze during the test: in production the cached plan lives until the next one.
      yield* Effect.acquireRelease(
        use("test.autovacuum", (client) => client`alter table runs set (autovacuum_enabled = false)`),
        () => Effect.ignore(use("test.autovacuum", (client) => client`alter table runs reset (autovacuum_enabled)`))
      )
      // A quiet queue whose statistics were taken while the table was small.
      yield* queue.sendMany(Array.from({ length: 50 }, (_, i) => runInput(q, { agentId: "a", conversationId: `c-${i % 5}` })))
      yield* use("test.analyze", (client) => client`analyze runs`)
      const connection = yield* Effect.acquireRelease(
        Effect.promise(() => sql.reserve()),
        (reserved) => Effect.sync(() => reserved.release())
      )
      // An idle worker polling: after five plans for its parameters PostgreSQL keeps a generic one.
      const claim = () => runClaimAvailable(connection, { queue: q, limit: 10, claimant: "cached-test", leaseMs: 60_000, now: null, claimId: randomUUID() })
      for (let poll = 0; poll < 12; poll++) {
        yield* Effect.promise(claim)
        yield* Effect.promise(() =>
          connection`update runs set status = 'pending', claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
                      where queue = ${q} and status = 'claimed'`)
      }
      // Then a burst: 20,000 runs in 2,000 conversations, before any ANALYZE.
      yield* use("test.backlog", (client) => client`
        insert into runs (organization_id, agent_id, conversation_id, queue, action_input, legacy_scope)
        select 'org-1', 'a', 'c-' || (g % 2000), ${q}, '{"n":1}'::jsonb, false from generate_series(1, 20000) g`)
      assert.strictEqual((yield* Effect.promise(claim)).length, 10)
      const [prepared] = yield* Effect.promise(() =>
        connection<Array<{ name: string; generic_plans: string }>>`
          select name, generic_plans::text from pg_prepared_statements
           where statement like '%candidates as%' and statement not like '%pg_prepared_statements%'`)
      assert.isAtLeast(Number(prepared!.generic_plans), 1, "the claim runs on a cached plan")
      // The cached plan, as EXECUTE would use it: parameters in the statement's order (now, queue, claimant, claim id, lease).
      const plan = yield* Effect.promise(() =>
        connection.unsafe(`explain (format json) execute "${prepared!.name}"(null, '${q}', 'cached-test', '${randomUUID()}', 60000)`))
      const all = planNodes(plan)
      assert.deepStrictEqual(all.filter((node) => node["Node Type"] === "Sort").length, 0, JSON.stringify(all, null, 1))
      assert.isTrue(indexesRead(all).includes("runs_claim_idx"), JSON.stringify(all, null, 1))
    }), { timeout: 120_000 })
})
