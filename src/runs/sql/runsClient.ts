/**
 * What every statement under src/runs/sql runs on: the pool, or a caller's postgres.js transaction.
 *
 * Timestamps are bound as text and cast by the server: drizzle replaces postgres.js's serializers for
 * date types, so binding a Date would depend on which client built the pool. `now` is the injected
 * clock (River's `coalesce(@now, now())`): null in production, where the database clock decides.
 */
import type postgres from "postgres"

export type RunsClient = postgres.Sql | postgres.TransactionSql

/** An instant as the statements bind it: ISO text, or null for the database's now(). */
export type NowParameter = string | null

/**
 * What every guarded settle binds: the runs, the claimant that must still own them, the clock, and per
 * run the claim it settles (the claim_id the claim answered), or null to accept any claim of this
 * claimant. The claimant is one per process; the claim token tells
 * this process's claims of one run apart, so a settle or heartbeat meant for an earlier claim (its
 * answer lost, then retried; or the run swept and claimed again by the same process) matches no row.
 *
 * The guard "still claimed by this claimant" is written `claimed_by = $claimant AND claimed_at IS NOT
 * NULL`, which the check constraint runs_claim_owner_check makes equal to `status = 'claimed'` and
 * claimed by it, and not with `status = 'claimed'` itself: that clause lets the planner read the
 * partial index of claimed runs (runs_lease_idx) instead of one primary-key probe per run, and it does
 * whenever its statistics were taken while few runs were claimed (an ANALYZE after a burst of sends
 * says none are). That plan reads every claimed run of every worker on each settle: 2.8 ms of server
 * CPU per batch of 10 with 8,000 runs claimed, 0.3 ms by primary key (test/runs/settlePlan.test.ts).
 */
export interface OwnedBatch {
  readonly ids: ReadonlyArray<number>
  readonly claimTokens: ReadonlyArray<string | null>
  readonly claimant: string
  readonly now: NowParameter
}

/** A guarded settle's answer: each run it settled, with the status it left the run in. */
export interface SettledRow {
  readonly id: string
  readonly status: string
}
