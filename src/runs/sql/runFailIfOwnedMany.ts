/**
 * runFailIfOwnedMany: records a failed attempt of each of the claimant's runs, in one statement.
 *
 * Shape: `UPDATE runs ... FROM unnest($ids, $messages)` guarded by status and claimant, as
 * graphile-worker's failJobs. The attempt is spent: below max_attempts the run goes back to pending
 * after its fixed retry_delay_seconds or, when that is NULL, an exponential backoff with jitter; at
 * max_attempts it ends `failed`. error_message keeps the last error either way. A run whose
 * cancellation was requested ends `cancelled`.
 *
 * Backoff: base = min(2^attempts, 300) seconds after the attempt is counted (2, 4, 8 ... s, capped at
 * 5 minutes), delayed by a uniform draw in [base/2, base] ("equal jitter") so runs that failed together
 * do not retry together.
 */
import type { OwnedBatch, RunsClient, SettledRow } from "./runsClient.ts"

export interface FailedRow extends SettledRow {
  readonly attempts: number
  readonly run_at: string
}

export const runFailIfOwnedMany = (
  client: RunsClient,
  p: OwnedBatch & { readonly messages: ReadonlyArray<string> }
) =>
  client<Array<FailedRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set attempts = r.attempts + 1,
           status = case when r.cancel_requested_at is not null then 'cancelled'
                         when r.attempts + 1 >= r.max_attempts then 'failed'
                         else 'pending' end,
           run_at = case when r.cancel_requested_at is null and r.attempts + 1 < r.max_attempts
                         then clock.now + coalesce(
                           r.retry_delay_seconds::float8,
                           least(300, power(2, r.attempts + 1)) * (0.5 + random() * 0.5)
                         ) * interval '1 second'
                         else r.run_at end,
           completed_at = case when r.cancel_requested_at is null and r.attempts + 1 < r.max_attempts
                               then null else clock.now end,
           error_message = t.message,
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from clock, unnest(
             ${p.ids as Array<number>}::bigint[], ${p.claimTokens as Array<string | null>}::text[], ${p.messages as Array<string>}::text[]
           ) as t(id, claim_token, message)
     where r.id = t.id and r.claimed_by = ${p.claimant} and r.claimed_at is not null -- = claimed (runsClient.ts)
       and (t.claim_token is null or r.claim_id = t.claim_token::uuid)
    returning r.id::text, r.status, r.attempts, r.run_at::text`
