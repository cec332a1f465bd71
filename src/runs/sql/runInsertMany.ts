/**
 * runInsertMany: a batch without idempotency keys, where every run is inserted.
 *
 * Shape: `WITH inserted AS (INSERT ... SELECT FROM unnest(...) RETURNING id, queue), notified AS
 * (one pg_notify per distinct queue) SELECT id`. Ids come from the identity sequence as unnest
 * produces the rows, in array order, so the returned ids sorted ascending are the input order.
 */
import type { RunRecord } from "../runInput.ts"
import { runsChannel } from "../runsChannel.ts"
import { runRecordsUnnest } from "./runRecordsUnnest.ts"
import type { RunsClient } from "./runsClient.ts"

export const runInsertMany = (client: RunsClient, runs: ReadonlyArray<RunRecord>) =>
  client<Array<{ id: string }>>`
    with inserted as (
      insert into runs (organization_id, agent_id, conversation_id, queue, action_input, priority,
                        run_at, expires_at, max_attempts, retry_delay_seconds)
      select organization_id, agent_id, conversation_id, queue, action_input, priority,
             coalesce(run_at, now() + coalesce(delay_ms, 0) * interval '1 millisecond'),
             expires_at, max_attempts, retry_delay_seconds
        from ${runRecordsUnnest(client, runs)}
      returning id, queue
    ),
    notified as (
      select count(pg_notify(${runsChannel}, queue)) as queues from (select distinct queue from inserted) q
    )
    select id::text from inserted cross join notified`
