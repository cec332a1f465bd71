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
 */
export interface OwnedBatch {
  readonly ids: ReadonlyArray<number>
  readonly claimTokens: ReadonlyArray<string | null>
  readonly claimant: string
  readonly now: NowParameter
}
