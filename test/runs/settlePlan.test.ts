/**
 * A settle or heartbeat of a batch must find its runs by primary key, whatever the statistics say.
 * Right after an ANALYZE taken while every run was pending, PostgreSQL believes no run is claimed, so
 * the partial index of claimed runs (runs_lease_idx) looks empty and cheaper than one primary-key probe
 * per run; but by then every worker's claims are in it, and a plan reading it reads every claimed run
 * of every worker on each settle (2.8 ms of server CPU per batch of 10 with 8,000 runs claimed, against
 * 0.3 ms by primary key). Asserted on the plan PostgreSQL chooses for each of the very statements
 * RunsQueue runs, over 1,000 claimed runs of a table analyzed when all were pending.
 */
import { randomUUID } from "node:crypto"
import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { runCompleteAndClaim } from "../../src/runs/sql/runCompleteAndClaim.ts"
import { runCompleteIfOwnedMany } from "../../src/runs/sql/runCompleteIfOwnedMany.ts"
import { runDeferIfOwnedMany } from "../../src/runs/sql/runDeferIfOwnedMany.ts"
import { runFailIfOwnedMany } from "../../src/runs/sql/runFailIfOwnedMany.ts"
import { runHeartbeatIfOwnedMany } from "../../src/runs/sql/runHeartbeatIfOwnedMany.ts"
import { runReleaseIfOwnedMany } from "../../src/runs/sql/runReleaseIfOwnedMany.ts"
import type { OwnedBatch, RunsClient } from "../../src/runs/sql/runsClient.ts"
import { freshQueue, movableClock, runInput, runsTestLayer } from "../support/runsHarness.ts"
import { explaining, indexesRead, planNodes } from "../support/statementPlan.ts"

const statements: ReadonlyArray<readonly [string, (client: RunsClient, batch: OwnedBatch) => Promise<unknown>]> = [
  ["complete", (client, batch) => runCompleteIfOwnedMany(client, batch)],
  ["fail", (client, batch) => runFailIfOwnedMany(client, { ...batch, messages: batch.ids.map(() => "boom") })],
  ["defer", (client, batch) => runDeferIfOwnedMany(client, { ...batch, delaysMs: batch.ids.map(() => 1_000) })],
  ["release", (client, batch) => runReleaseIfOwnedMany(client, batch)],
  ["heartbeat", (client, batch) => runHeartbeatIfOwnedMany(client, { ...batch, leaseMs: 60_000 })]
]

layer(runsTestLayer(movableClock()), { excludeTestServices: true })("the settle plans", (it) => {
  it.effect("find a batch's runs by primary key even when the statistics say no run is claimed", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql, use } = yield* Database
      const q = freshQueue("settle-plan")
      yield* queue.sendMany(Array.from({ length: 2_000 }, () => runInput(q)))
      yield* use("test.analyze", (client) => client`analyze runs`)
      const claimed = yield* queue.claim(q, { limit: 1_000 })
      assert.strictEqual(claimed.length, 1_000)
      const batch: OwnedBatch = {
        ids: claimed.slice(0, 10).map((run) => run.id),
        claimTokens: claimed.slice(0, 10).map((run) => run.claimToken),
        claimant: queue.claimantId,
        now: null
      }
      for (const [name, statement] of statements) {
        const rows = yield* Effect.promise(() => statement(explaining(sql), batch))
        const all = planNodes(rows)
        assert.deepStrictEqual(indexesRead(all), ["runs_pkey"], `${name}: ${JSON.stringify(all, null, 1)}`)
      }
      // The work loop's statement completes by the same guard, beside its claim (which reads runs_claim_idx).
      const rows = yield* Effect.promise(() =>
        runCompleteAndClaim(explaining(sql), { ...batch, queue: q, limit: 10, leaseMs: 60_000, claimId: randomUUID() }))
      const indexes = indexesRead(planNodes(rows))
      assert.isFalse(indexes.includes("runs_lease_idx"), JSON.stringify(indexes))
      assert.isTrue(indexes.includes("runs_pkey"), JSON.stringify(indexes))
    }))
})
