/**
 * RunsQueue: how producers enqueue runs. Claiming, settling and the work loop come in a later issue.
 *
 * `send` and `sendMany` share one statement: the batch travels as a single JSON text parameter, is
 * expanded by `jsonb_to_recordset`, inserted with `ON CONFLICT DO NOTHING` on the idempotency index, and
 * answered in input order with `{ id, created }`. The same statement NOTIFYs once per queue; PostgreSQL
 * delivers a NOTIFY only when the transaction commits, so inside a caller's transaction workers are
 * woken exactly when the runs become visible, never before.
 */
import { is } from "drizzle-orm"
import type { PgTransaction } from "drizzle-orm/pg-core"
import { PostgresJsSession, type PostgresJsQueryResultHKT } from "drizzle-orm/postgres-js"
import { Context, Effect, Layer } from "effect"
import type postgres from "postgres"
import { Database } from "../db/Database.ts"
import { DatabaseError } from "../db/DatabaseError.ts"
import { defaultMaxAttempts, InvalidRunInput, toRunRecord, type RunRecord, type SendRunInput } from "./runInput.ts"

/** The LISTEN channel for new runs; the payload is the queue name. One channel for every queue, so
 * queue names are not bound by PostgreSQL's 63-byte channel-name limit. */
export const runsChannel = "runlane_runs"

/** Largest `sendMany` batch; larger batches should be split by the caller. */
export const maxBatchSize = 10_000

/** A Drizzle transaction over postgres.js, as handed to the callback of `db.transaction`. */
export type DrizzleTransaction = PgTransaction<PostgresJsQueryResultHKT, any, any>

export interface SendOptions {
  /** Write inside this transaction: the run exists exactly when the caller's transaction commits. */
  readonly tx?: DrizzleTransaction | undefined
}

export interface SendResult {
  readonly id: number
  /** false when the idempotency key matched a run that is still pending or claimed; `id` is that run. */
  readonly created: boolean
}

/**
 * Rounds of re-sending rows whose idempotency conflict could not be resolved in the statement's
 * snapshot (the conflicting run was committed by another transaction during the statement, or finished
 * right after). Each round either inserts or finds the run; two rounds settle every case but a
 * pathological churn of the same key.
 */
const maxIdempotencyRounds = 5

interface InsertedRow {
  readonly ord: string
  readonly id: string | null
  readonly created: boolean
}

type Client = postgres.Sql | postgres.TransactionSql

/**
 * Optional columns of a single-run INSERT, each with the SQL of its value. A column the run leaves at
 * its table default is left out of the statement, so the common run binds five parameters, as a
 * hand-written INSERT would (each extra cast parameter measured ~2% of a send in npm run bench).
 */
const optionalColumns = [
  ["priority", "::int", (run: RunRecord) => (run.priority === 0 ? undefined : run.priority)],
  ["max_attempts", "::int", (run: RunRecord) => (run.max_attempts === defaultMaxAttempts ? undefined : run.max_attempts)],
  ["run_at", "::text::timestamptz", (run: RunRecord) => run.run_at ?? undefined],
  ["expires_at", "::text::timestamptz", (run: RunRecord) => run.expires_at ?? undefined],
  ["retry_delay_seconds", "::int", (run: RunRecord) => run.retry_delay_seconds ?? undefined],
  ["idempotency_key", "::text", (run: RunRecord) => run.idempotency_key ?? undefined]
] as const

/**
 * One run, the common case: scalar parameters, no CTE, the NOTIFY in RETURNING. The statement text is
 * assembled only from the constant fragments above (never from input), so there are at most 2^6 shapes,
 * each prepared once per connection. Without an idempotency key no conflict is possible and the
 * ON CONFLICT clause is left out. Answers no row when the key matched; `insertBatch` then resolves it.
 */
const insertOne = (client: Client, run: RunRecord) => {
  // legacy_scope is written false by every runlane insert: its scope is its columns (schema/runs.ts).
  const columns = ["organization_id", "agent_id", "conversation_id", "queue", "action_input", "legacy_scope"]
  const values = ["$1", "$2", "$3", "$4", "$5::text::jsonb", "false"]
  const parameters: Array<string | number | null> = [
    run.organization_id,
    run.agent_id,
    run.conversation_id,
    run.queue,
    run.action_input_json
  ]
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
  parameters.push(runsChannel)
  const statement = [
    `insert into runs (${columns.join(", ")}) values (${values.join(", ")})`,
    run.idempotency_key === null ? "" : onConflictDoNothing,
    `returning id::text, pg_notify($${parameters.length}, queue)`
  ].join(" ")
  return client.unsafe<Array<{ id: string }>>(statement, parameters, { prepare: true })
}

/** Must match the predicate of runs_idempotency_key_uniq exactly, or PostgreSQL cannot infer the arbiter. */
const onConflictDoNothing =
  "on conflict (organization_id, idempotency_key) where idempotency_key is not null and status in ('pending', 'claimed') do nothing"

/** The batch's columns as one array parameter each, unnested in input order (`i.ord` counts from 1). */
const unnestRuns = (client: Client, runs: ReadonlyArray<RunRecord>) => client`
  unnest(
    ${runs.map((r) => r.organization_id)}::text[], ${runs.map((r) => r.agent_id)}::text[],
    ${runs.map((r) => r.conversation_id)}::text[], ${runs.map((r) => r.queue)}::text[],
    ${runs.map((r) => r.action_input_json)}::text[]::jsonb[], ${runs.map((r) => r.priority)}::int[],
    ${runs.map((r) => r.delay_ms)}::float8[], ${runs.map((r) => r.run_at)}::text[]::timestamptz[],
    ${runs.map((r) => r.expires_at)}::text[]::timestamptz[], ${runs.map((r) => r.max_attempts)}::int[],
    ${runs.map((r) => r.retry_delay_seconds)}::int[], ${runs.map((r) => r.idempotency_key)}::text[]
  ) with ordinality as i(organization_id, agent_id, conversation_id, queue, action_input, priority,
                         delay_ms, run_at, expires_at, max_attempts, retry_delay_seconds, idempotency_key, ord)`

/**
 * A batch without idempotency keys: every run is inserted. Ids come from the identity sequence as
 * unnest produces the rows, in array order, so the returned ids sorted ascending are the input order.
 * Timestamps travel as text[] and are cast by the server: drizzle replaces postgres.js's serializers
 * for date types, so binding them as timestamptz[] would depend on which client built the pool.
 */
const insertBatchWithoutKeys = (client: Client, runs: ReadonlyArray<RunRecord>) =>
  client<Array<{ id: string }>>`
    with inserted as (
      insert into runs (organization_id, agent_id, conversation_id, queue, action_input, priority,
                        run_at, expires_at, max_attempts, retry_delay_seconds, legacy_scope)
      select organization_id, agent_id, conversation_id, queue, action_input, priority,
             coalesce(run_at, now() + coalesce(delay_ms, 0) * interval '1 millisecond'),
             expires_at, max_attempts, retry_delay_seconds, false
        from ${unnestRuns(client, runs)}
      returning id, queue
    ),
    notified as (
      select count(pg_notify(${runsChannel}, queue)) as queues from (select distinct queue from inserted) q
    )
    select id::text from inserted cross join notified`

/**
 * A batch with idempotency keys. Ids are drawn with nextval() before the insert so every input row keeps
 * its id whether it was inserted or deduped, and each row answers its own `{ id, created }`.
 */
const insertBatch = (client: Client, runs: ReadonlyArray<RunRecord>) =>
  client<Array<InsertedRow>>`
    with input as materialized (
      select nextval('runs_id_seq') as id, i.* from ${unnestRuns(client, runs)}
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

const clientOf = (tx: DrizzleTransaction | undefined, pool: postgres.Sql): Client | InvalidRunInput => {
  if (tx === undefined) return pool
  if (is(tx._.session, PostgresJsSession)) return tx._.session.client
  return new InvalidRunInput({ field: "options.tx", message: "must be a Drizzle transaction of the postgres-js driver" })
}

/**
 * Inserts validated runs and answers `{ id, created }` per run, in input order. A plain async function,
 * wrapped in one Effect by the caller: each Effect layer on this path costs a measurable share of a send.
 */
const writeRuns = async (client: Client, records: ReadonlyArray<RunRecord>): Promise<Array<SendResult>> => {
  if (records.length === 1) {
    const [row] = await insertOne(client, records[0]!)
    if (row !== undefined) return [{ id: Number(row.id), created: true }]
  } else if (records.every((record) => record.idempotency_key === null)) {
    const rows = await insertBatchWithoutKeys(client, records)
    return rows.map((row) => Number(row.id)).sort((a, b) => a - b).map((id) => ({ id, created: true }))
  }
  const results: Array<SendResult> = new Array(records.length)
  // Positions in `records` still to resolve.
  let unresolved = records.map((_, i) => i)
  for (let round = 0; unresolved.length > 0; round++) {
    if (round === maxIdempotencyRounds) throw new IdempotencyChurn()
    const positions = unresolved
    const rows = await insertBatch(client, positions.map((i) => records[i]!))
    unresolved = []
    for (const row of rows) {
      // ordinality counts from 1
      const position = positions[Number(row.ord) - 1]!
      if (row.id === null) unresolved.push(position)
      else results[position] = { id: Number(row.id), created: row.created }
    }
  }
  return results
}

class IdempotencyChurn extends Error {
  constructor() {
    super(`idempotency keys kept changing state over ${maxIdempotencyRounds} attempts`)
  }
}

const toDatabaseError = (operation: string) => (cause: unknown): DatabaseError =>
  cause instanceof IdempotencyChurn
    ? new DatabaseError({ operation, message: cause.message, retryable: true, cause })
    : DatabaseError.fromCause(operation, cause)

export interface RunCount {
  readonly queue: string
  readonly status: string
  readonly count: number
}

/** A count over a very large table gives up rather than hold a connection for long. */
export const countsTimeoutMs = 2_000

export class RunsQueue extends Context.Service<RunsQueue, {
  readonly send: (input: SendRunInput, options?: SendOptions) => Effect.Effect<SendResult, InvalidRunInput | DatabaseError>
  /** Writes the whole batch in one statement; answers in input order. Nothing is written if any run is invalid. */
  readonly sendMany: (
    inputs: ReadonlyArray<SendRunInput>,
    options?: SendOptions
  ) => Effect.Effect<ReadonlyArray<SendResult>, InvalidRunInput | DatabaseError>
  /**
   * How many runs each queue holds in each status (for /metrics). It reads the whole table, so it runs
   * under a statement timeout (`countsTimeoutMs`) and callers should cache the answer.
   */
  readonly counts: Effect.Effect<ReadonlyArray<RunCount>, DatabaseError>
}>()("runlane/RunsQueue") {
  static readonly layer = Layer.effect(
    RunsQueue,
    Effect.gen(function*() {
      const database = yield* Database
      const sendError = toDatabaseError("RunsQueue.send")
      const sendManyError = toDatabaseError("RunsQueue.sendMany")

      // Plain Effect.suspend rather than Effect.fn: on this hot path Effect.fn's span and call-site
      // capture measured ~70 µs per call, a fifth of a whole INSERT round trip (npm run bench).
      // Callers who want a span wrap the call in Effect.withSpan.
      const send = (input: SendRunInput, options?: SendOptions) =>
        Effect.suspend((): Effect.Effect<SendResult, InvalidRunInput | DatabaseError> => {
          const record = toRunRecord(input, 0, false)
          if (record instanceof InvalidRunInput) return Effect.fail(record)
          const client = clientOf(options?.tx, database.sql)
          if (client instanceof InvalidRunInput) return Effect.fail(client)
          return Effect.tryPromise({
            try: () => writeRuns(client, [record]).then((results) => results[0]!),
            catch: sendError
          })
        })

      const sendMany = (inputs: ReadonlyArray<SendRunInput>, options?: SendOptions) =>
        Effect.suspend((): Effect.Effect<ReadonlyArray<SendResult>, InvalidRunInput | DatabaseError> => {
          if (inputs.length > maxBatchSize) {
            return Effect.fail(new InvalidRunInput({ field: "inputs", message: `at most ${maxBatchSize} runs per batch` }))
          }
          const records: Array<RunRecord> = []
          for (let i = 0; i < inputs.length; i++) {
            const record = toRunRecord(inputs[i]!, i, true)
            if (record instanceof InvalidRunInput) return Effect.fail(record)
            records.push(record)
          }
          if (records.length === 0) return Effect.succeed([])
          const client = clientOf(options?.tx, database.sql)
          if (client instanceof InvalidRunInput) return Effect.fail(client)
          return Effect.tryPromise({ try: () => writeRuns(client, records), catch: sendManyError })
        })

      const counts = database.use("RunsQueue.counts", (sql) =>
        sql.begin(async (tx) => {
          await tx`select set_config('statement_timeout', ${String(countsTimeoutMs)}, true)`
          return tx<Array<RunCount>>`
            select queue, status, count(*)::float8 as count from runs group by queue, status order by queue, status`
        }))

      return RunsQueue.of({ send, sendMany, counts })
    })
  )
}
