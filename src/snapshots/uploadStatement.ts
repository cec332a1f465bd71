/**
 * Pure: the text of a group-commit statement (uploadGroups.ts) for a given number of rows. Each row is
 * inserted only when its run's scope columns equal the upload's scope; the first writer of a run wins.
 * `order by u.run_id` fixes the order in which the rows take their index keys (the join may reorder
 * them otherwise): statements of every process take keys in one order, so they never deadlock
 * (uploadGrouping.ts).
 */

const columnsPerRow = 7

export const statementFor = (rows: number): string => {
  const values: Array<string> = []
  for (let row = 0; row < rows; row++) {
    const first = row * columnsPerRow
    const [runId, organization, agent, conversation, snapshot, bytes, status] = Array.from(
      { length: columnsPerRow },
      (_, column) => `$${first + column + 1}`
    )
    values.push(`(${runId}::bigint, ${organization}::text, ${agent}::text, ${conversation}::text, ${snapshot}::text, ${bytes}::integer, ${status}::text)`)
  }
  return `insert into agent_transcript_snapshots
  (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
select r.organization_id, r.agent_id, r.conversation_id, r.id, u.snapshot_jsonl, u.byte_size, u.terminal_status
  from (values ${values.join(", ")})
    as u (run_id, organization_id, agent_id, conversation_id, snapshot_jsonl, byte_size, terminal_status)
  join runs r on r.id = u.run_id and r.organization_id = u.organization_id
             and r.agent_id = u.agent_id and r.conversation_id = u.conversation_id
 order by u.run_id
on conflict (organization_id, agent_id, conversation_id, run_id) do nothing
returning run_id::text, id::text`
}

