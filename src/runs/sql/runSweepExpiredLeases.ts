/**
 * runSweepExpiredLeases: takes back claims whose lease ran out (the worker died or stopped
 * heartbeating), whoever made them.
 *
 * Shape: `WITH expired AS (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n) UPDATE ... RETURNING`. The row
 * lock re-checks status and lease on the latest row version, so a heartbeat that committed meanwhile
 * keeps its run. The lost attempt is counted (unlike the reference system's sweep): a run that kills
 * its worker every time ends `failed` at max_attempts instead of looping forever. Otherwise the run is
 * pending again with its run_at unchanged, due at once and in its old place. The old worker's next
 * heartbeat or settle finds it no longer owned (LeaseLost). A run whose cancellation was requested
 * ends `cancelled`.
 */
import type { NowParameter, RunsClient, SettledRow } from "./runsClient.ts"

/** error_message of a run that ran out of attempts by losing its lease. */
export const leaseExpiredMessage = "lease expired: the worker stopped heartbeating"

export const runSweepExpiredLeases = (client: RunsClient, p: { readonly limit: number; readonly now: NowParameter }) =>
  client<Array<SettledRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now),
    expired as (
      select r.id
        from runs r, clock
       where r.status = 'claimed' and r.lease_expires_at < clock.now
       order by r.lease_expires_at
       limit ${p.limit}
         for update of r skip locked
    )
    update runs r
       set attempts = r.attempts + 1,
           status = case when r.cancel_requested_at is not null then 'cancelled'
                         when r.attempts + 1 >= r.max_attempts then 'failed'
                         else 'pending' end,
           completed_at = case when r.cancel_requested_at is null and r.attempts + 1 < r.max_attempts
                               then null else clock.now end,
           error_message = ${leaseExpiredMessage},
           claimed_by = null, claimed_at = null, claim_id = null, lease_expires_at = null
      from expired, clock
     where r.id = expired.id
    returning r.id::text, r.status`
