/**
 * runCancel: cancels one run by id, whoever owns it.
 *
 * Shape: `WITH changed AS (UPDATE ... WHERE status IN ('pending', 'claimed') RETURNING) SELECT` from
 * it, or, when nothing changed, the run's current status from the statement's snapshot (one round
 * trip for every outcome). A pending run becomes `cancelled` at once. A claimed run cannot be taken
 * from its worker mid-handler, so it gets cancel_requested_at and keeps running; its worker's next
 * heartbeat or settle ends it `cancelled` and tells the worker (the guarded statements all check the
 * column). A run that is already completed, failed or cancelled is left as it is.
 */
import type { NowParameter, RunsClient } from "./runsClient.ts"

export interface CancelRow {
  /** The status after the statement. */
  readonly status: string
  readonly changed: boolean
}

export const runCancel = (client: RunsClient, p: { readonly id: number; readonly now: NowParameter }) =>
  client<Array<CancelRow>>`
    with clock as (select coalesce(${p.now}::text::timestamptz, now()) as now),
    changed as (
      update runs r
         set status = case when r.status = 'pending' then 'cancelled' else r.status end,
             completed_at = case when r.status = 'pending' then clock.now else r.completed_at end,
             cancel_requested_at = case when r.status = 'claimed'
                                        then coalesce(r.cancel_requested_at, clock.now) end
        from clock
       where r.id = ${p.id} and r.status in ('pending', 'claimed')
      returning r.status
    )
    select status, true as changed from changed
    union all
    select status, false as changed from runs where id = ${p.id} and not exists (select 1 from changed)`
