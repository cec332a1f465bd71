/**
 * runHeartbeatIfOwnedMany: moves the lease of the claimant's runs forward by `leaseMs`.
 *
 * Shape: one `UPDATE ... FROM unnest($ids, $claimTokens) WHERE <claimed by $me> RETURNING`,
 * so a process heartbeats all its runs in one round trip. A run whose cancellation was requested
 * ends `cancelled` here instead (the cancel protocol, see runCancel.ts) and is returned with that
 * status so the worker learns it. An id missing from the answer was no longer owned: the sweep took it.
 */
import type { OwnedBatch, RunsClient } from "./runsClient.ts"

export interface HeartbeatRow {
  readonly id: string
  readonly status: "claimed" | "cancelled"
  readonly lease_expires_at: string | null
}

export const runHeartbeatIfOwnedMany = (
  client: RunsClient,
  p: OwnedBatch & { readonly leaseMs: number }
) =>
  client<Array<HeartbeatRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    update runs r
       set status = case when r.cancel_requested_at is null then 'claimed' else 'cancelled' end,
           lease_expires_at = case when r.cancel_requested_at is null
                                   then clock.now + ${p.leaseMs}::float8 * interval '1 millisecond' end,
           claimed_by = case when r.cancel_requested_at is null then r.claimed_by end,
           claimed_at = case when r.cancel_requested_at is null then r.claimed_at end,
           claim_id = case when r.cancel_requested_at is null then r.claim_id end,
           completed_at = case when r.cancel_requested_at is null then null else clock.now end
      from clock, unnest(${p.ids as Array<number>}::bigint[], ${p.claimTokens as Array<string | null>}::text[]) as t(id, claim_token)
     where r.id = t.id and r.claimed_by = ${p.claimant} and r.claimed_at is not null -- = claimed (runsClient.ts)
       and (t.claim_token is null or r.claim_id = t.claim_token::uuid)
    returning r.id::text, r.status, r.lease_expires_at::text`
