/**
 * runDeleteExpiredBatch: one keyset batch of the retention pass, in one short transaction.
 *
 * Shape: SELECT the next `limit` terminal runs finished before `cutoff` with `id > after`, ORDER BY id,
 * FOR UPDATE SKIP LOCKED; then DELETE their snapshots; then DELETE the runs. A run that a conversation's
 * latest completed snapshot points at is never selected, so hydration always finds that transcript;
 * the conversation's superseded snapshots go with their runs. Two statements, not one with CTEs,
 * because the snapshot reference is ON DELETE RESTRICT, which checks each deleted run at once, before a
 * sibling CTE's deletes are visible. Answers the last id looked at, for the next batch.
 */
import type postgres from "postgres"

export interface DeletedBatch {
  /** The greatest id selected (the next batch starts after it); null when nothing was left. */
  readonly lastId: number | null
  readonly runs: number
  readonly snapshots: number
}

export const runDeleteExpiredBatch = async (
  sql: postgres.Sql,
  p: { readonly cutoff: string; readonly after: number; readonly limit: number }
): Promise<DeletedBatch> =>
  sql.begin(async (tx) => {
    const doomed = await tx<Array<{ id: string }>>`
      select r.id::text from runs r
       where r.id > ${p.after}
         and r.status in ('completed', 'failed', 'cancelled')
         and coalesce(r.completed_at, r.created_at) < ${p.cutoff}::timestamptz
         and not exists (
           select 1 from agent_transcript_snapshots s
            where s.run_id = r.id and s.terminal_status = 'completed'
              and s.run_id = (select max(l.run_id) from agent_transcript_snapshots l
                               where l.organization_id = s.organization_id and l.agent_id = s.agent_id
                                 and l.conversation_id = s.conversation_id and l.terminal_status = 'completed'))
       order by r.id
       limit ${p.limit}
         for update of r skip locked`
    if (doomed.length === 0) return { lastId: null, runs: 0, snapshots: 0 }
    const ids = doomed.map((row) => Number(row.id))
    const snapshots = await tx`delete from agent_transcript_snapshots where run_id = any(${ids}::bigint[])`
    const runs = await tx`delete from runs where id = any(${ids}::bigint[])`
    return { lastId: ids[ids.length - 1]!, runs: runs.count, snapshots: snapshots.count }
  })
