/**
 * runCompleteIfOwnedMany: settles the claimant's runs as completed, in one statement.
 *
 * Shape: graphile-worker's completeJobs and River's JobSetStateIfRunningMany: ids as one array, the
 * owner checked in WHERE, and RETURNING naming exactly the runs that were still owned. A run whose
 * cancellation was requested while it ran ends `cancelled` instead, and says so. runCompleteAndClaim
 * completes runs the same way, in the statement that also claims (the work loop's path).
 */
import type { OwnedBatch, RunsClient, SettledRow } from "./runsClient.ts"

export const runCompleteIfOwnedMany = (
  client: RunsClient,
  p: OwnedBatch
) =>
  client<Array<SettledRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set status = case when r.cancel_requested_at is null then 'completed' else 'cancelled' end,
           completed_at = clock.now,
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from clock, unnest(${p.ids as Array<number>}::bigint[], ${p.claimTokens as Array<string | null>}::text[]) as t(id, claim_token)
     where r.id = t.id and r.claimed_by = ${p.claimant} and r.claimed_at is not null -- = claimed (runsClient.ts)
       and (t.claim_token is null or r.claim_id = t.claim_token::uuid)
    returning r.id::text, r.status`
