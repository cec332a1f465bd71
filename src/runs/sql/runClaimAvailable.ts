/**
 * runClaimAvailable: claims up to `limit` runs of one queue in one statement.
 *
 * Shape: `WITH candidates AS (SELECT ... ORDER BY priority DESC, run_at, id LIMIT n FOR UPDATE OF r
 * SKIP LOCKED) UPDATE runs ... FROM candidates RETURNING ...`, as graphile-worker's getJobs and River's
 * JobGetAvailable. Which runs, in which order and why the limit is literal: claimEligibility.ts. A
 * worker with finished runs to complete claims with runCompleteAndClaim instead.
 */
import { claimableRun, type ClaimedRunRow, claimedRunColumns, claimLimit, claimOrder } from "./claimEligibility.ts"
import type { NowParameter, RunsClient } from "./runsClient.ts"

export interface ClaimParameters {
  readonly queue: string
  readonly limit: number
  readonly claimant: string
  readonly leaseMs: number
  readonly now: NowParameter
  /** Set on every run this statement claims: a UUID made by the caller (runReleaseUnanswered.ts). */
  readonly claimId: string
}

export const runClaimAvailable = (client: RunsClient, p: ClaimParameters) =>
  client<Array<ClaimedRunRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now),
    candidates as (
      select r.id
        from runs r
       where r.status = 'pending' and r.queue = ${p.queue} and ${client.unsafe(claimableRun)}
       ${client.unsafe(claimOrder)}
       limit ${claimLimit(client, p.limit)}
         for update of r skip locked
    )
    update runs r
       set status = 'claimed',
           claimed_by = ${p.claimant},
           claimed_at = clock.now,
           claim_id = ${p.claimId}::uuid,
           lease_expires_at = clock.now + ${p.leaseMs}::float8 * interval '1 millisecond'
      from candidates, clock
     where r.id = candidates.id
    returning ${client.unsafe(claimedRunColumns)}`
