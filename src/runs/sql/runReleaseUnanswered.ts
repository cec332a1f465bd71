/**
 * runReleaseUnanswered: hands back to pending, without spending an attempt, the runs one claim
 * statement took when its answer never arrived (the connection failed after the statement committed,
 * so no handler will ever run them). Without it they stayed claimed until their lease ran out, and the
 * sweep then counted an attempt for work that never started.
 *
 * Shape: one `UPDATE ... WHERE claim_id = $claimId` guarded by status and claimant: a claim statement
 * sets the same claim id (made by the caller) on every run it takes. Rare, so it reads the partial
 * index of claimed runs rather than having one of its own. A run whose cancellation was requested ends
 * `cancelled`: the SET is runReleaseIfOwnedMany's, and the two must stay alike.
 */
import type { NowParameter, RunsClient, SettledRow } from "./runsClient.ts"

export interface ReleaseUnansweredParameters {
  readonly claimId: string
  readonly claimant: string
  readonly now: NowParameter
}

export const runReleaseUnanswered = (client: RunsClient, p: ReleaseUnansweredParameters) =>
  client<Array<SettledRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set status = case when r.cancel_requested_at is null then 'pending' else 'cancelled' end,
           completed_at = case when r.cancel_requested_at is null then null else clock.now end,
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from clock
     where r.status = 'claimed' and r.claim_id = ${p.claimId}::uuid and r.claimed_by = ${p.claimant}
    returning r.id::text, r.status`
