/**
 * runInsertMany: a batch without idempotency keys, where every run is inserted.
 *
 * Shape: `WITH inserted AS (INSERT ... SELECT FROM unnest($1::text[], ...) RETURNING id, queue),
 * notified AS (one pg_notify per distinct queue) SELECT id`. Ids come from the identity sequence as
 * unnest produces the rows, in array order, so the returned ids sorted ascending are the input order.
 * A column no run of the batch sets away from its table default is left out, as in runInsertOne:
 * unnesting and casting five all-default arrays measured ~8% of a 1,000-run batch on PostgreSQL 15
 * (npm run bench). The text is assembled only from the constant fragments below, so there are at most
 * 2^5 shapes, each prepared once per connection.
 */
import { defaultMaxAttempts, type RunRecord } from "../runInput.ts"
import { runsChannel } from "../runsChannel.ts"
import type { RunsClient } from "./runsClient.ts"

type Value = string | number | null

/** Columns every insert writes, with the array cast of each; a new always-written column goes here. */
const requiredColumns: ReadonlyArray<readonly [string, string, (run: RunRecord) => Value]> = [
  ["organization_id", "::text[]", (run) => run.organization_id],
  ["agent_id", "::text[]", (run) => run.agent_id],
  ["conversation_id", "::text[]", (run) => run.conversation_id],
  ["queue", "::text[]", (run) => run.queue],
  ["action_input", "::text[]::jsonb[]", (run) => run.action_input_json]
]

/** Columns written only when some run of the batch differs from the table default. */
const optionalColumns: ReadonlyArray<readonly [string, string, (run: RunRecord) => Value, Value]> = [
  ["priority", "::int[]", (run) => run.priority, 0],
  ["expires_at", "::text[]::timestamptz[]", (run) => run.expires_at, null],
  ["max_attempts", "::int[]", (run) => run.max_attempts, defaultMaxAttempts],
  ["retry_delay_seconds", "::int[]", (run) => run.retry_delay_seconds, null]
]

export const runInsertMany = (client: RunsClient, runs: ReadonlyArray<RunRecord>) => {
  const parameters: Array<Array<Value> | string> = []
  const unnested: Array<string> = []
  const names: Array<string> = []
  const columns: Array<string> = []
  const selected: Array<string> = []
  const bind = (name: string, cast: string, values: Array<Value>) => {
    parameters.push(values)
    unnested.push(`$${parameters.length}${cast}`)
    names.push(name)
  }
  for (const [column, cast, pick] of requiredColumns) {
    bind(column, cast, runs.map(pick))
    columns.push(column)
    selected.push(column)
  }
  for (const [column, cast, pick, fallback] of optionalColumns) {
    if (runs.every((run) => pick(run) === fallback)) continue
    bind(column, cast, runs.map(pick))
    columns.push(column)
    selected.push(column)
  }
  if (runs.some((run) => run.run_at !== null || run.delay_ms !== null)) {
    bind("run_at", "::text[]::timestamptz[]", runs.map((run) => run.run_at))
    bind("delay_ms", "::float8[]", runs.map((run) => run.delay_ms))
    columns.push("run_at")
    selected.push("coalesce(run_at, now() + coalesce(delay_ms, 0) * interval '1 millisecond')")
  }
  // Every runlane insert marks its runs' scope as their columns (schema/runs.ts, legacy_scope).
  columns.push("legacy_scope")
  selected.push("false")
  parameters.push(runsChannel)
  const statement = `
    with inserted as (
      insert into runs (${columns.join(", ")})
      select ${selected.join(", ")} from unnest(${unnested.join(", ")}) as i(${names.join(", ")})
      returning id, queue
    ),
    notified as (
      select count(pg_notify($${parameters.length}, queue)) as queues from (select distinct queue from inserted) q
    )
    select id::text from inserted cross join notified`
  return client.unsafe<Array<{ id: string }>>(statement, parameters as Array<never>, { prepare: true })
}
