/**
 * runStatsForQueue: one queue's runs by status, and how long its oldest due run has waited.
 *
 * Shape: one aggregate over the queue's rows with FILTER per status. The age is measured from run_at
 * (when the run became due), over pending runs that are due and not expired: a run delayed on purpose
 * is not late, and an expired one will never run. It reads every row of the queue, so the caller runs
 * it under a statement timeout.
 */
import type { NowParameter, RunsClient } from "./runsClient.ts"

export interface StatsRow {
  readonly pending: number
  readonly claimed: number
  readonly completed: number
  readonly failed: number
  readonly cancelled: number
  readonly oldest_pending_age_ms: number | null
}

export const runStatsForQueue = (client: RunsClient, p: { readonly queue: string; readonly now: NowParameter }) =>
  client<Array<StatsRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now)
    select count(*) filter (where r.status = 'pending')::float8 as pending,
           count(*) filter (where r.status = 'claimed')::float8 as claimed,
           count(*) filter (where r.status = 'completed')::float8 as completed,
           count(*) filter (where r.status = 'failed')::float8 as failed,
           count(*) filter (where r.status = 'cancelled')::float8 as cancelled,
           (extract(epoch from clock.now - min(r.run_at) filter (
              where r.status = 'pending' and r.run_at <= clock.now
                and (r.expires_at is null or r.expires_at > clock.now))) * 1000)::float8 as oldest_pending_age_ms
      from clock left join runs r on r.queue = ${p.queue}
     group by clock.now`
