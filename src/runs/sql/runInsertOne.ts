/**
 * runInsertOne: one run, the common case of `send`.
 *
 * Shape: `INSERT INTO runs (...) VALUES ($1, ...) [ON CONFLICT ... DO NOTHING] RETURNING id,
 * pg_notify(...)`: scalar parameters, no CTE, the NOTIFY in RETURNING. A column the run leaves at its
 * table default is left out, so the common run binds five parameters, as a hand-written INSERT would
 * (each extra cast parameter measured ~2% of a send in npm run bench). The text is assembled only from
 * the constant fragments below (never from input), so there are at most 2^6 shapes, each prepared once
 * per connection. Without an idempotency key no conflict is possible and ON CONFLICT is left out.
 * Answers no row when the key matched; writeRuns then resolves it with runInsertManyWithKeys.
 */
import { defaultMaxAttempts, type RunRecord } from "../runInput.ts"
import { runsChannel } from "../runsChannel.ts"
import { onConflictDoNothing } from "./runInsertManyWithKeys.ts"
import type { RunsClient } from "./runsClient.ts"

/** Columns every insert writes, with the SQL of each value; a new always-written column goes here. */
const requiredColumns = [
  ["organization_id", "", (run: RunRecord) => run.organization_id],
  ["agent_id", "", (run: RunRecord) => run.agent_id],
  ["conversation_id", "", (run: RunRecord) => run.conversation_id],
  ["queue", "", (run: RunRecord) => run.queue],
  ["action_input", "::text::jsonb", (run: RunRecord) => run.action_input_json]
] as const

/** Columns written only when the run differs from the table default. */
const optionalColumns = [
  ["priority", "::int", (run: RunRecord) => (run.priority === 0 ? undefined : run.priority)],
  ["max_attempts", "::int", (run: RunRecord) => (run.max_attempts === defaultMaxAttempts ? undefined : run.max_attempts)],
  ["run_at", "::text::timestamptz", (run: RunRecord) => run.run_at ?? undefined],
  ["expires_at", "::text::timestamptz", (run: RunRecord) => run.expires_at ?? undefined],
  ["retry_delay_seconds", "::int", (run: RunRecord) => run.retry_delay_seconds ?? undefined],
  ["idempotency_key", "::text", (run: RunRecord) => run.idempotency_key ?? undefined]
] as const

export const runInsertOne = (client: RunsClient, run: RunRecord) => {
  const columns: Array<string> = []
  const values: Array<string> = []
  const parameters: Array<string | number | null> = []
  for (const [column, cast, pick] of requiredColumns) {
    parameters.push(pick(run))
    columns.push(column)
    values.push(`$${parameters.length}${cast}`)
  }
  for (const [column, cast, pick] of optionalColumns) {
    const value = pick(run)
    if (value === undefined) continue
    parameters.push(value)
    columns.push(column)
    values.push(`$${parameters.length}${cast}`)
  }
  if (run.delay_ms !== null) {
    parameters.push(run.delay_ms)
    columns.push("run_at")
    values.push(`now() + $${parameters.length}::float8 * interval '1 millisecond'`)
  }
  // Every runlane insert marks its run's scope as its columns (schema/runs.ts, legacy_scope).
  columns.push("legacy_scope")
  values.push("false")
  parameters.push(runsChannel)
  const statement = [
    `insert into runs (${columns.join(", ")}) values (${values.join(", ")})`,
    run.idempotency_key === null ? "" : onConflictDoNothing,
    `returning id::text, pg_notify($${parameters.length}, queue)`
  ].join(" ")
  return client.unsafe<Array<{ id: string }>>(statement, parameters, { prepare: true })
}
