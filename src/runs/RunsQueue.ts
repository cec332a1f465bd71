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
import { InvalidRunInput, toRunRecord, type RunRecord, type SendRunInput } from "./runInput.ts"

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
  readonly ord: number
  readonly id: string | null
  readonly created: boolean
}

const insertRuns = (client: postgres.Sql | postgres.TransactionSql, records: ReadonlyArray<RunRecord>) =>
  client<Array<InsertedRow>>`
    with input as materialized (
      select nextval('runs_id_seq') as id, i.*
        from jsonb_to_recordset(${JSON.stringify(records)}::text::jsonb) as i(
          ord int, queue text, organization_id text, agent_id text, conversation_id text,
          action_input jsonb, priority int, delay_ms float8, run_at timestamptz, expires_at timestamptz,
          max_attempts int, retry_delay_seconds int, idempotency_key text)
    ),
    inserted as (
      insert into runs (id, organization_id, agent_id, conversation_id, queue, action_input, priority,
                        run_at, expires_at, max_attempts, retry_delay_seconds, idempotency_key)
      select id, organization_id, agent_id, conversation_id, queue, action_input, priority,
             coalesce(run_at, now() + coalesce(delay_ms, 0) * interval '1 millisecond'),
             expires_at, max_attempts, retry_delay_seconds, idempotency_key
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
    select input.ord,
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

const clientOf = (tx: DrizzleTransaction | undefined, pool: postgres.Sql): postgres.Sql | postgres.TransactionSql => {
  if (tx === undefined) return pool
  if (is(tx._.session, PostgresJsSession)) return tx._.session.client
  throw new TypeError("RunsQueue: options.tx must be a Drizzle transaction of the postgres-js driver")
}

export class RunsQueue extends Context.Service<RunsQueue, {
  readonly send: (input: SendRunInput, options?: SendOptions) => Effect.Effect<SendResult, InvalidRunInput | DatabaseError>
  /** Writes the whole batch in one statement; answers in input order. Nothing is written if any run is invalid. */
  readonly sendMany: (
    inputs: ReadonlyArray<SendRunInput>,
    options?: SendOptions
  ) => Effect.Effect<ReadonlyArray<SendResult>, InvalidRunInput | DatabaseError>
}>()("runlane/RunsQueue") {
  static readonly layer = Layer.effect(
    RunsQueue,
    Effect.gen(function*() {
      const database = yield* Database

      const write = Effect.fnUntraced(function*(
        operation: string,
        records: ReadonlyArray<RunRecord>,
        options: SendOptions | undefined
      ) {
        const client = yield* Effect.try({
          try: () => clientOf(options?.tx, database.sql),
          catch: (cause) => new InvalidRunInput({ field: "options.tx", message: String(cause) })
        })
        const results: Array<SendResult | undefined> = new Array(records.length)
        let unresolved = records
        for (let round = 0; unresolved.length > 0; round++) {
          if (round === maxIdempotencyRounds) {
            return yield* new DatabaseError({
              operation,
              message: `idempotency keys kept changing state over ${maxIdempotencyRounds} attempts`,
              retryable: true,
              cause: null
            })
          }
          const batch = unresolved
          const rows = yield* Effect.tryPromise({
            try: () => insertRuns(client, batch),
            catch: (cause) => DatabaseError.fromCause(operation, cause)
          })
          const retry: Array<RunRecord> = []
          rows.forEach((row, i) => {
            if (row.id === null) retry.push(batch[i]!)
            else results[row.ord] = { id: Number(row.id), created: row.created }
          })
          unresolved = retry
        }
        return results as Array<SendResult>
      })

      const send = Effect.fn("RunsQueue.send")(function*(input: SendRunInput, options?: SendOptions) {
        const record = toRunRecord(input, 0, false)
        if (record instanceof InvalidRunInput) return yield* record
        const [result] = yield* write("RunsQueue.send", [record], options)
        return result!
      })

      const sendMany = Effect.fn("RunsQueue.sendMany")(function*(
        inputs: ReadonlyArray<SendRunInput>,
        options?: SendOptions
      ) {
        if (inputs.length > maxBatchSize) {
          return yield* new InvalidRunInput({ field: "inputs", message: `at most ${maxBatchSize} runs per batch` })
        }
        const records: Array<RunRecord> = []
        for (let i = 0; i < inputs.length; i++) {
          const record = toRunRecord(inputs[i]!, i, true)
          if (record instanceof InvalidRunInput) return yield* record
          records.push(record)
        }
        if (records.length === 0) return []
        return yield* write("RunsQueue.sendMany", records, options)
      })

      return RunsQueue.of({ send, sendMany })
    })
  )
}
