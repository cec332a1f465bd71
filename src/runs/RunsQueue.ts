/**
 * RunsQueue: enqueue, claim and settle runs; the statements live one per file under ./sql.
 *
 * `send`/`sendMany` insert (writeRuns.ts picks the statement) and NOTIFY `runlane_runs` on commit.
 * `claim` takes up to `limit` runs of a queue in one statement (runClaimAvailable.ts says how a
 * conversation's runs stay in order and one at a time). Every later transition is one statement
 * guarded by the run still being claimed by this claimant, in this claim (runsClient.ts), in batches (`completeMany` ...) or
 * one run at a time, where zero rows is a typed LeaseLost and a pending cancellation a RunCancelled.
 */
import { randomUUID } from "node:crypto"
import { is } from "drizzle-orm"
import type { PgTransaction } from "drizzle-orm/pg-core"
import { PostgresJsSession, type PostgresJsQueryResultHKT } from "drizzle-orm/postgres-js"
import { Context, Effect, Layer } from "effect"
import type postgres from "postgres"
import { Database } from "../db/Database.ts"
import { DatabaseError } from "../db/DatabaseError.ts"
import { InvalidRunsArgument, LeaseLost, RunCancelled, RunNotFound, RunsConfigError } from "./runErrors.ts"
import { InvalidRunInput, toRunRecord, type RunRecord, type SendRunInput } from "./runInput.ts"
import { resolveRunsConfig, runsConfigFromEnvironment, type RunsConfig, type RunsQueueOptions } from "./runsConfig.ts"
import { claimRuns, type ClaimedRun, type CompletedAndClaimed } from "./claimRuns.ts"
import { settleOutcome, type RunRef, type SettleOutcome } from "./settleOutcome.ts"
import { runCancel } from "./sql/runCancel.ts"
import { runGetById } from "./sql/runGetById.ts"
import { recordSweep } from "./dispatchMetrics.ts"
import { runCompleteIfOwnedMany } from "./sql/runCompleteIfOwnedMany.ts"
import { runDeferIfOwnedMany } from "./sql/runDeferIfOwnedMany.ts"
import { runFailIfOwnedMany } from "./sql/runFailIfOwnedMany.ts"
import { runHeartbeatIfOwnedMany } from "./sql/runHeartbeatIfOwnedMany.ts"
import { runReleaseIfOwnedMany } from "./sql/runReleaseIfOwnedMany.ts"
import { runReleaseUnanswered } from "./sql/runReleaseUnanswered.ts"
import type { RunsClient } from "./sql/runsClient.ts"
import { runStatsForQueue } from "./sql/runStatsForQueue.ts"
import { runSweepExpiredLeases } from "./sql/runSweepExpiredLeases.ts"
import type { CancelOutcome, QueueStats, RunCount, RunState, SweepResult } from "./runReports.ts"
import { IdempotencyChurn, writeRuns, type SendResult } from "./writeRuns.ts"

export { runsChannel } from "./runsChannel.ts"
export type { ClaimedRun, CompletedAndClaimed } from "./claimRuns.ts"
export type { RunRef, SettleOutcome } from "./settleOutcome.ts"
export type { SendResult } from "./writeRuns.ts"
export type { CancelOutcome, QueueStats, RunCount, RunState, SweepResult } from "./runReports.ts"

/** Largest `sendMany` batch; larger batches should be split by the caller. */
export const maxBatchSize = 10_000

/** Largest claim and settle batch: far above any worker's free slots, small enough for one statement. */
export const maxClaimBatch = 1_000

/** A claim token's shape: the UUID text PostgreSQL answers for gen_random_uuid(). */
const uuidPattern = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** Claims the sweep takes back per statement; it is called again while a full batch comes back. */
export const sweepBatch = 1_000

/** A Drizzle transaction over postgres.js, as handed to the callback of `db.transaction`. */
export type DrizzleTransaction = PgTransaction<PostgresJsQueryResultHKT, any, any>

export interface SendOptions {
  /** Write inside this transaction: the run exists exactly when the caller's transaction commits. */
  readonly tx?: DrizzleTransaction | undefined
}

/** A count over a very large table gives up rather than hold a connection for long. */
export const countsTimeoutMs = 2_000

type One<E> = Effect.Effect<void, LeaseLost | RunCancelled | E>
type Many = Effect.Effect<SettleOutcome, InvalidRunsArgument | DatabaseError>

export class RunsQueue extends Context.Service<RunsQueue, {
  /** This process's claimant id: the prefix and a UUID drawn when the layer was built. */
  readonly claimantId: string
  readonly config: RunsConfig
  readonly send: (input: SendRunInput, options?: SendOptions) => Effect.Effect<SendResult, InvalidRunInput | DatabaseError>
  /** Writes the whole batch in one statement; answers in input order. Nothing is written if any run is invalid. */
  readonly sendMany: (
    inputs: ReadonlyArray<SendRunInput>,
    options?: SendOptions
  ) => Effect.Effect<ReadonlyArray<SendResult>, InvalidRunInput | DatabaseError>
  /** Claims up to `limit` (1-1,000) due runs of `queue`: priority, then run_at, then id. */
  readonly claim: (
    queue: string,
    options: { readonly limit: number }
  ) => Effect.Effect<ReadonlyArray<ClaimedRun>, InvalidRunsArgument | DatabaseError>
  /**
   * `completeMany(runs)` and `claim(queue, { limit })` in one statement, one round trip and one commit:
   * a worker loop's path, where finished runs and free slots come together. `limit` may be 0 here.
   * The claim does not see this call's completions (runCompleteAndClaim.ts): a conversation whose run
   * is completed here has its next run claimed by a later call.
   */
  readonly completeManyAndClaim: (
    runs: ReadonlyArray<RunRef>,
    queue: string,
    options: { readonly limit: number }
  ) => Effect.Effect<CompletedAndClaimed, InvalidRunsArgument | DatabaseError>
  /** Moves the run's lease forward by `leaseMs`. */
  readonly heartbeat: (run: RunRef) => One<InvalidRunsArgument | DatabaseError>
  readonly heartbeatMany: (runs: ReadonlyArray<RunRef>) => Many
  readonly complete: (run: RunRef) => One<InvalidRunsArgument | DatabaseError>
  readonly completeMany: (runs: ReadonlyArray<RunRef>) => Many
  /** Spends the attempt: retried after its delay, or `failed` with `error` at max_attempts. */
  readonly fail: (run: RunRef, error: string) => One<InvalidRunsArgument | DatabaseError>
  readonly failMany: (runs: ReadonlyArray<{ readonly run: RunRef; readonly error: string }>) => Many
  /** Back to pending until now + delayMs, no attempt spent. */
  readonly defer: (run: RunRef, delayMs: number) => One<InvalidRunsArgument | DatabaseError>
  readonly deferMany: (runs: ReadonlyArray<{ readonly run: RunRef; readonly delayMs: number }>) => Many
  /** Back to pending now, keeping its place; no attempt spent. */
  readonly release: (run: RunRef) => One<InvalidRunsArgument | DatabaseError>
  readonly releaseMany: (runs: ReadonlyArray<RunRef>) => Many
  /** One run's dispatch state (status, attempts, run_at, last error, claimant), or RunNotFound. */
  readonly get: (runId: number) => Effect.Effect<RunState, RunNotFound | DatabaseError>
  /** Cancels a run by id, whoever holds it. */
  readonly cancel: (runId: number) => Effect.Effect<CancelOutcome, RunNotFound | DatabaseError>
  /** Takes back every claim whose lease ran out, counting the lost attempt. */
  readonly sweep: Effect.Effect<SweepResult, DatabaseError>
  /** One queue's runs by status and its oldest waiting run's age, under `countsTimeoutMs`. */
  readonly stats: (queue: string) => Effect.Effect<QueueStats, DatabaseError>
  /**
   * How many runs each queue holds in each status (for /metrics). It reads the whole table, so it runs
   * under a statement timeout (`countsTimeoutMs`) and callers should cache the answer.
   */
  readonly counts: Effect.Effect<ReadonlyArray<RunCount>, DatabaseError>
}>()("runlane/RunsQueue") {
  /** Settings from the options, over the defaults in runsConfig.ts. */
  static readonly layerWith = (options: RunsQueueOptions) =>
    Layer.effect(
      RunsQueue,
      Effect.gen(function*() {
        const config = resolveRunsConfig(options)
        if (config instanceof RunsConfigError) return yield* config
        return yield* make(yield* Database, config)
      })
    )

  /** Settings from RUNLANE_RUN_LEASE_MS and RUNLANE_RUN_HEARTBEAT_MS, each optional. */
  static readonly layer = Layer.effect(
    RunsQueue,
    Effect.gen(function*() {
      return yield* make(yield* Database, yield* runsConfigFromEnvironment)
    })
  )
}

const clientOf = (tx: DrizzleTransaction | undefined, pool: postgres.Sql): RunsClient | InvalidRunInput => {
  if (tx === undefined) return pool
  if (is(tx._.session, PostgresJsSession)) return tx._.session.client
  return new InvalidRunInput({ field: "options.tx", message: "must be a Drizzle transaction of the postgres-js driver" })
}

const toDatabaseError = (operation: string) => (cause: unknown): DatabaseError =>
  cause instanceof IdempotencyChurn
    ? new DatabaseError({ operation, message: cause.message, retryable: true, cause })
    : DatabaseError.fromCause(operation, cause)

/** Longest `defer`: a year, as for a send's delay (a longer one is almost certainly a unit mistake). */
export const maxDelayMs = 31_536_000_000

const isDelay = (delayMs: unknown): boolean =>
  typeof delayMs === "number" && Number.isFinite(delayMs) && delayMs >= 0 && delayMs <= maxDelayMs

const make = Effect.fnUntraced(function*(database: Database["Service"], config: RunsConfig) {
  const claimantId = `${config.claimantPrefix}:${randomUUID()}`
  const sql = database.sql
  const now = () => (config.now === undefined ? null : config.now().toISOString())
  const sendError = toDatabaseError("RunsQueue.send")
  const sendManyError = toDatabaseError("RunsQueue.sendMany")

  // Plain Effect.suspend rather than Effect.fn: on this hot path Effect.fn's span and call-site
  // capture measured ~70 µs per call, a fifth of a whole INSERT round trip (npm run bench).
  // Callers who want a span wrap the call in Effect.withSpan.
  const send = (input: SendRunInput, options?: SendOptions) =>
    Effect.suspend((): Effect.Effect<SendResult, InvalidRunInput | DatabaseError> => {
      const record = toRunRecord(input, 0, false)
      if (record instanceof InvalidRunInput) return Effect.fail(record)
      const client = clientOf(options?.tx, sql)
      if (client instanceof InvalidRunInput) return Effect.fail(client)
      return Effect.tryPromise({ try: () => writeRuns(client, [record]).then((results) => results[0]!), catch: sendError })
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
      const client = clientOf(options?.tx, sql)
      if (client instanceof InvalidRunInput) return Effect.fail(client)
      return Effect.tryPromise({ try: () => writeRuns(client, records), catch: sendManyError })
    })

  // Claims and settles are called once per batch, so Effect.fn's span costs little per run here.
  const checkClaim = (queue: string, limit: number, least: number) => {
    if (typeof queue !== "string" || queue.length === 0) {
      return new InvalidRunsArgument({ argument: "queue", message: "must be a non-empty string" })
    }
    if (!Number.isInteger(limit) || limit < least || limit > maxClaimBatch) {
      return new InvalidRunsArgument({ argument: "limit", message: `must be a whole number from ${least} to ${maxClaimBatch}, got ${limit}` })
    }
    return undefined
  }

  /**
   * Runs a claim statement under a claim id made here. When it fails, the statement may still have
   * committed (the connection failed before its answer came back): the runs it claimed, found by that
   * id, are handed back at once without spending an attempt (runReleaseUnanswered.ts), instead of
   * waiting out their lease for the sweep to count one. If that fails too, the sweep still takes them.
   * A statement still running on the server when the hand-back runs can commit after it: the sweep
   * takes those.
   */
  const claimUnder = (operation: string, claim: (claimId: string) => Promise<CompletedAndClaimed>) => {
    const claimId = randomUUID()
    return database.use(operation, () => claim(claimId)).pipe(
      Effect.tapError(() =>
        database.use("RunsQueue.releaseUnanswered", () => runReleaseUnanswered(sql, { claimId, claimant: claimantId, now: now() })).pipe(
          Effect.tap((rows) =>
            rows.length === 0 ? Effect.void : Effect.logWarning("Runs of a claim whose answer was lost handed back", { runs: rows.length })
          ),
          Effect.catch((error) => Effect.logWarning("Runs of a claim whose answer was lost not handed back; the sweep will", error))
        )
      )
    )
  }

  const claim = Effect.fn("RunsQueue.claim")(function*(queue: string, options: { readonly limit: number }) {
    const bad = checkClaim(queue, options.limit, 1)
    if (bad !== undefined) return yield* bad
    const { claimed } = yield* claimUnder("RunsQueue.claim", (claimId) =>
      claimRuns(sql, { queue, limit: options.limit, ids: [], claimTokens: [], claimant: claimantId, leaseMs: config.leaseMs, now: now(), claimId }))
    return claimed
  })

  const completeManyAndClaim = Effect.fn("RunsQueue.completeManyAndClaim")(
    function*(runs: ReadonlyArray<RunRef>, queue: string, options: { readonly limit: number }) {
      const bad = checkClaim(queue, options.limit, 0) ?? checkBatch(runs)
      if (bad !== undefined) return yield* bad
      return yield* claimUnder("RunsQueue.completeManyAndClaim", (claimId) =>
        claimRuns(sql, { queue, limit: options.limit, ...claimsOf(runs), claimant: claimantId, leaseMs: config.leaseMs, now: now(), claimId }))
    }
  )

  /** Runs one guarded batch statement and sorts its answer into settled / cancelled / lost. */
  const settle = (
    operation: string,
    ids: ReadonlyArray<number>,
    statement: () => PromiseLike<ReadonlyArray<{ readonly id: string; readonly status: string }>>
  ): Effect.Effect<SettleOutcome, DatabaseError> =>
    ids.length === 0
      ? Effect.succeed(settleOutcome(ids, []))
      : Effect.map(database.use(`RunsQueue.${operation}`, statement), (rows) => settleOutcome(ids, rows)).pipe(
        Effect.withSpan(`RunsQueue.${operation}`)
      )

  /** A batch of one, told as a typed failure when the run was lost or cancelled. */
  const one = <E>(operation: string, runId: number, many: Effect.Effect<SettleOutcome, E>): One<E> =>
    Effect.flatMap(many, (outcome): One<never> => {
      if (outcome.lost.length > 0) return Effect.fail(new LeaseLost({ runId, operation }))
      if (outcome.cancelled.length > 0) return Effect.fail(new RunCancelled({ runId }))
      return Effect.void
    })

  /** A public batch: refused above maxClaimBatch runs or with a malformed claim token, then settled. */
  const many = <A>(runs: ReadonlyArray<A>, refOf: (entry: A) => RunRef, f: (runs: ReadonlyArray<A>) => Many): Many => {
    const bad = checkBatch(runs.map(refOf))
    return bad === undefined ? f(runs) : Effect.fail(bad)
  }

  /** At most maxClaimBatch runs, each with a well-formed claim token when it has one. */
  const checkBatch = (runs: ReadonlyArray<RunRef>) =>
    runs.length > maxClaimBatch
      ? new InvalidRunsArgument({ argument: "runs", message: `at most ${maxClaimBatch} runs per call, got ${runs.length}` })
      : badClaimToken(runs)

  /** The ids and claim tokens a guarded statement binds. */
  const claimsOf = (runs: ReadonlyArray<RunRef>) => ({
    ids: runs.map((run) => run.id),
    claimTokens: runs.map((run) => run.claimToken ?? null)
  })
  /** A claim token is the UUID a claim answered; anything else would fail the whole batch's statement. */
  const badClaimToken = (runs: ReadonlyArray<RunRef>) => {
    const bad = runs.findIndex((run) => run.claimToken !== undefined && !uuidPattern.test(run.claimToken))
    return bad < 0
      ? undefined
      : new InvalidRunsArgument({ argument: `claimToken of run ${runs[bad]!.id}`, message: "must be the claimToken its claim answered (a UUID)" })
  }

  const heartbeatRuns = (runs: ReadonlyArray<RunRef>) => {
    const claims = claimsOf(runs)
    return settle("heartbeat", claims.ids, () =>
      runHeartbeatIfOwnedMany(sql, { ...claims, claimant: claimantId, leaseMs: config.leaseMs, now: now() }))
  }
  const completeRuns = (runs: ReadonlyArray<RunRef>) => {
    const claims = claimsOf(runs)
    return settle("complete", claims.ids, () => runCompleteIfOwnedMany(sql, { ...claims, claimant: claimantId, now: now() }))
  }
  const releaseRuns = (runs: ReadonlyArray<RunRef>) => {
    const claims = claimsOf(runs)
    return settle("release", claims.ids, () => runReleaseIfOwnedMany(sql, { ...claims, claimant: claimantId, now: now() }))
  }
  const failRuns = (runs: ReadonlyArray<{ readonly run: RunRef; readonly error: string }>) => {
    const claims = claimsOf(runs.map((entry) => entry.run))
    // PostgreSQL text cannot hold U+0000; an error message is diagnostics, so it is cleaned, not refused.
    const messages = runs.map((entry) => String(entry.error).replaceAll("\u0000", "\uFFFD"))
    return settle("fail", claims.ids, () => runFailIfOwnedMany(sql, { ...claims, messages, claimant: claimantId, now: now() }))
  }
  const deferRuns = (runs: ReadonlyArray<{ readonly run: RunRef; readonly delayMs: number }>): Many => {
    const bad = runs.findIndex((entry) => !isDelay(entry.delayMs))
    if (bad >= 0) {
      return Effect.fail(new InvalidRunsArgument({ argument: `delayMs of run ${bad}`, message: "must be a number of milliseconds from 0 to a year" }))
    }
    const claims = claimsOf(runs.map((entry) => entry.run))
    const delaysMs = runs.map((entry) => entry.delayMs)
    return settle("defer", claims.ids, () => runDeferIfOwnedMany(sql, { ...claims, delaysMs, claimant: claimantId, now: now() }))
  }

  const cancel = Effect.fn("RunsQueue.cancel")(function*(runId: number) {
    const rows = yield* database.use("RunsQueue.cancel", () => runCancel(sql, { id: runId, now: now() }))
    const row = rows[0]
    if (row === undefined) return yield* new RunNotFound({ runId })
    if (!row.changed) return { _tag: "AlreadyFinal", status: row.status } as CancelOutcome
    return (row.status === "cancelled" ? { _tag: "Cancelled" } : { _tag: "CancelRequested" }) as CancelOutcome
  })

  const get = Effect.fn("RunsQueue.get")(function*(runId: number) {
    const [row] = yield* database.use("RunsQueue.get", () => runGetById(sql, runId))
    if (row === undefined) return yield* new RunNotFound({ runId })
    const date = (text: string | null) => (text === null ? null : new Date(text))
    return {
      id: Number(row.id),
      queue: row.queue,
      status: row.status,
      attempts: row.attempts,
      maxAttempts: row.max_attempts,
      runAt: new Date(row.run_at),
      error: row.error_message,
      claimedBy: row.claimed_by,
      leaseExpiresAt: date(row.lease_expires_at),
      cancelRequestedAt: date(row.cancel_requested_at),
      createdAt: new Date(row.created_at),
      completedAt: date(row.completed_at)
    } satisfies RunState
  })

  const sweep = Effect.gen(function*() {
    const totals = { returned: 0, failed: 0, cancelled: 0 }
    for (;;) {
      const rows = yield* database.use("RunsQueue.sweep", () => runSweepExpiredLeases(sql, { limit: sweepBatch, now: now() }))
      const batch = { returned: 0, failed: 0, cancelled: 0 }
      for (const row of rows) {
        if (row.status === "pending") batch.returned++
        else if (row.status === "failed") batch.failed++
        else batch.cancelled++
      }
      // Counted per committed batch, so a later batch that fails does not hide this one.
      yield* recordSweep(batch)
      totals.returned += batch.returned
      totals.failed += batch.failed
      totals.cancelled += batch.cancelled
      if (rows.length < sweepBatch) return totals as SweepResult
    }
  }).pipe(Effect.withSpan("RunsQueue.sweep"))

  const stats = (queue: string) =>
    database.use("RunsQueue.stats", (pool) =>
      pool.begin(async (tx) => {
        await tx`select set_config('statement_timeout', ${String(countsTimeoutMs)}, true)`
        const [row] = await runStatsForQueue(tx, { queue, now: now() })
        return {
          pending: row!.pending,
          claimed: row!.claimed,
          completed: row!.completed,
          failed: row!.failed,
          cancelled: row!.cancelled,
          oldestPendingAgeMs: row!.oldest_pending_age_ms
        } satisfies QueueStats
      }))

  const counts = database.use("RunsQueue.counts", (pool) =>
    pool.begin(async (tx) => {
      await tx`select set_config('statement_timeout', ${String(countsTimeoutMs)}, true)`
      return tx<Array<RunCount>>`
        select queue, status, count(*)::float8 as count from runs group by queue, status order by queue, status`
    }))

  return RunsQueue.of({
    claimantId,
    config,
    send,
    sendMany,
    claim,
    completeManyAndClaim,
    heartbeat: (run) => one("heartbeat", run.id, many([run], (r) => r, heartbeatRuns)),
    heartbeatMany: (runs) => many(runs, (run) => run, heartbeatRuns),
    complete: (run) => one("complete", run.id, many([run], (r) => r, completeRuns)),
    completeMany: (runs) => many(runs, (run) => run, completeRuns),
    fail: (run, error) => one("fail", run.id, many([{ run, error }], (entry) => entry.run, failRuns)),
    failMany: (runs) => many(runs, (entry) => entry.run, failRuns),
    defer: (run, delayMs) => one("defer", run.id, many([{ run, delayMs }], (entry) => entry.run, deferRuns)),
    deferMany: (runs) => Effect.suspend(() => many(runs, (entry) => entry.run, deferRuns)),
    release: (run) => one("release", run.id, many([run], (r) => r, releaseRuns)),
    releaseMany: (runs) => many(runs, (run) => run, releaseRuns),
    get,
    cancel,
    sweep,
    stats,
    counts
  })
})
