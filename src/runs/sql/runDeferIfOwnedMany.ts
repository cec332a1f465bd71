/**
 * runDeferIfOwnedMany: puts the claimant's runs back to pending until now + each run's delay, without
 * spending an attempt.
 *
 * Shape: `UPDATE runs ... FROM unnest($ids, $delays)` guarded by status and claimant. For a run that
 * could not start now (its conversation is busy elsewhere): it keeps its id, so it stays its
 * conversation's oldest pending run and nothing of the conversation overtakes it. A run whose
 * cancellation was requested ends `cancelled`.
 */
import type { OwnedBatch, RunsClient, SettledRow } from "./runsClient.ts"

export const runDeferIfOwnedMany = (
  client: RunsClient,
  p: OwnedBatch & { readonly delaysMs: ReadonlyArray<number> }
) =>
  client<Array<SettledRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set status = case when r.cancel_requested_at is null then 'pending' else 'cancelled' end,
           run_at = case when r.cancel_requested_at is null
                         then clock.now + t.delay_ms * interval '1 millisecond' else r.run_at end,
           completed_at = case when r.cancel_requested_at is null then null else clock.now end,
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from clock, unnest(
             ${p.ids as Array<number>}::bigint[], ${p.claimTokens as Array<string | null>}::text[], ${p.delaysMs as Array<number>}::float8[]
           ) as t(id, claim_token, delay_ms)
     where r.id = t.id and r.claimed_by = ${p.claimant} and r.claimed_at is not null -- = claimed (runsClient.ts)
       and (t.claim_token is null or r.claim_id = t.claim_token::uuid)
    returning r.id::text, r.status`
