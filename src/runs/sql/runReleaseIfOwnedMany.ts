/**
 * runReleaseIfOwnedMany: hands the claimant's runs back to pending at once, without spending an
 * attempt (a worker stopping with runs it never started or could not finish).
 *
 * Shape: one `UPDATE ... WHERE id = ANY($ids)` guarded by status and claimant. run_at is kept, so a
 * released run keeps its place in line rather than going behind runs that became due meanwhile. A run
 * whose cancellation was requested ends `cancelled`.
 */
import type { OwnedBatch, RunsClient, SettledRow } from "./runsClient.ts"

export const runReleaseIfOwnedMany = (
  client: RunsClient,
  p: OwnedBatch
) =>
  client<Array<SettledRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set status = case when r.cancel_requested_at is null then 'pending' else 'cancelled' end,
           completed_at = case when r.cancel_requested_at is null then null else clock.now end,
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from clock, unnest(${p.ids as Array<number>}::bigint[], ${p.claimTokens as Array<string | null>}::text[]) as t(id, claim_token)
     where r.id = t.id and r.claimed_by = ${p.claimant} and r.claimed_at is not null -- = claimed (runsClient.ts)
       and (t.claim_token is null or r.claim_id = t.claim_token::uuid)
    returning r.id::text, r.status`
