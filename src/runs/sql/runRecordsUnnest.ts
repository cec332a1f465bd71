/**
 * The FROM item both batch inserts read: a batch's columns as one array parameter each, unnested in
 * input order (`i.ord` counts from 1). A fragment, not a statement: runInsertMany and
 * runInsertManyWithKeys embed it. Timestamps travel as text[] and are cast by the server (see runsClient.ts).
 */
import type { RunRecord } from "../runInput.ts"
import type { RunsClient } from "./runsClient.ts"

export const runRecordsUnnest = (client: RunsClient, runs: ReadonlyArray<RunRecord>) => client`
  unnest(
    ${runs.map((r) => r.organization_id)}::text[], ${runs.map((r) => r.agent_id)}::text[],
    ${runs.map((r) => r.conversation_id)}::text[], ${runs.map((r) => r.queue)}::text[],
    ${runs.map((r) => r.action_input_json)}::text[]::jsonb[], ${runs.map((r) => r.priority)}::int[],
    ${runs.map((r) => r.delay_ms)}::float8[], ${runs.map((r) => r.run_at)}::text[]::timestamptz[],
    ${runs.map((r) => r.expires_at)}::text[]::timestamptz[], ${runs.map((r) => r.max_attempts)}::int[],
    ${runs.map((r) => r.retry_delay_seconds)}::int[], ${runs.map((r) => r.idempotency_key)}::text[]
  ) with ordinality as i(organization_id, agent_id, conversation_id, queue, action_input, priority,
                         delay_ms, run_at, expires_at, max_attempts, retry_delay_seconds, idempotency_key, ord)`
