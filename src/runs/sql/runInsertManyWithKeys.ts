/**
 * runInsertManyWithKeys: a batch in which some runs carry idempotency keys.
 *
 * Shape: ids drawn with nextval() in a materialized CTE before the insert, so every input row keeps
 * its id whether it was inserted or deduped; `INSERT ... ON CONFLICT DO NOTHING` on the idempotency
 * index; then each input row answers its own `{ id, created }` in input order, looking the winner up
 * among this batch's rows first and among live runs second. An id of NULL means the conflicting run
 * could not be seen in this snapshot (committed by another transaction during the statement, or
 * finished right after): writeRuns sends that row again.
 */
import type { RunRecord } from "../runInput.ts"
import { runsChannel } from "../runsChannel.ts"
import { runRecordsUnnest } from "./runRecordsUnnest.ts"
import type { RunsClient } from "./runsClient.ts"

/** Must match the predicate of runs_idempotency_key_uniq exactly, or PostgreSQL cannot infer the arbiter. */
export const onConflictDoNothing =
  "on conflict (organization_id, idempotency_key) where idempotency_key is not null and status in ('pending', 'claimed') do nothing"

export interface InsertedRow {
  readonly ord: string
  readonly id: string | null
  readonly created: boolean
}

export const runInsertManyWithKeys = (client: RunsClient, runs: ReadonlyArray<RunRecord>) =>
  client<Array<InsertedRow>>`
    with input as materialized (
      select nextval('runs_id_seq') as id, i.* from ${runRecordsUnnest(client, runs)}
    ),
    inserted as (
      insert into runs (id, organization_id, agent_id, conversation_id, queue, action_input, priority,
                        run_at, expires_at, max_attempts, retry_delay_seconds, idempotency_key, legacy_scope)
      select id, organization_id, agent_id, conversation_id, queue, action_input, priority,
             coalesce(run_at, now() + coalesce(delay_ms, 0) * interval '1 millisecond'),
             expires_at, max_attempts, retry_delay_seconds, idempotency_key, false
        from input
       order by ord
      on conflict (organization_id, idempotency_key)
         where idempotency_key is not null and status in ('pending', 'claimed')
         do nothing
      returning id, queue
    ),
    notified as (
      select count(pg_notify(${runsChannel}, queue)) as queues from (select distinct queue from inserted) q
    )
    select input.ord::text,
           coalesce(
             inserted.id,
             -- a duplicate key earlier in this same batch (invisible to the lookup below)
             (select first.id from input first join inserted done on done.id = first.id
               where first.organization_id = input.organization_id
                 and first.idempotency_key = input.idempotency_key
               limit 1),
             (select existing.id from runs existing
               where existing.organization_id = input.organization_id
                 and existing.idempotency_key = input.idempotency_key
                 and existing.status in ('pending', 'claimed')
               limit 1)
           )::text as id,
           inserted.id is not null as created
      from input
     cross join notified
      left join inserted on inserted.id = input.id
     order by input.ord`
