/**
 * RunRetention: deletes finished runs older than RUNLANE_RETENTION_DAYS (default 30), in keyset batches
 * of short transactions, never a run that a conversation's latest completed transcript points at (its
 * superseded transcripts go first, with their runs). `layer` runs a pass at start and then every hour,
 * logging what it deleted; a failed pass is logged and tried again at the next one.
 */
import { Config, Context, Effect, Layer, Schedule } from "effect"
import { Database } from "../db/Database.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"
import { InvalidRunsArgument } from "./runErrors.ts"
import { runDeleteExpiredBatch } from "./sql/runDeleteExpiredBatch.ts"

export const retentionDefaults = { days: 30, batchSize: 1_000, intervalMs: 3_600_000 } as const

export interface RetentionResult {
  readonly runs: number
  readonly snapshots: number
}

export class RunRetention extends Context.Service<RunRetention, {
  /** One pass: every finished run older than the retention, batch by batch. `now` is injectable for tests. */
  readonly prune: (now?: Date) => Effect.Effect<RetentionResult, DatabaseError>
  readonly days: number
}>()("runlane/RunRetention") {
  static readonly layerWith = (options: { readonly days: number; readonly batchSize?: number }) =>
    Layer.effect(RunRetention, make(options.days, options.batchSize ?? retentionDefaults.batchSize))

  /** RUNLANE_RETENTION_DAYS (1 to 36,500), with a pass at start and every hour for the life of the layer. */
  static readonly layer = Layer.effect(
    RunRetention,
    Effect.gen(function*() {
      const days = yield* Config.Int("RUNLANE_RETENTION_DAYS").pipe(Config.withDefault(retentionDefaults.days))
      if (!Number.isInteger(days) || days < 1 || days > 36_500) {
        return yield* new InvalidRunsArgument({ argument: "RUNLANE_RETENTION_DAYS", message: `must be a whole number of days from 1 to 36500, got ${days}` })
      }
      const retention = yield* make(days, retentionDefaults.batchSize)
      const pass = retention.prune().pipe(
        Effect.tap((result) => result.runs > 0 ? Effect.logInfo("Retention pass", result) : Effect.void),
        Effect.catchCause((cause) => Effect.logWarning("Retention pass failed; trying again at the next", cause)),
        Effect.annotateLogs({ module: "runlane/RunRetention" })
      )
      yield* Effect.forkScoped(Effect.repeat(pass, Schedule.spaced(retentionDefaults.intervalMs)))
      return retention
    })
  )
}

const make = (days: number, batchSize: number) =>
  Effect.gen(function*() {
    const database = yield* Database
    const prune = (now: Date = new Date()) =>
      Effect.gen(function*() {
        const cutoff = new Date(now.getTime() - days * 86_400_000).toISOString()
        const total = { runs: 0, snapshots: 0 }
        for (let after = 0; ;) {
          const batch = yield* database.use("RunRetention.prune", (sql) => runDeleteExpiredBatch(sql, { cutoff, after, limit: batchSize }))
          if (batch.lastId === null) return total
          total.runs += batch.runs
          total.snapshots += batch.snapshots
          after = batch.lastId
        }
      }).pipe(Effect.withSpan("RunRetention.prune"))
    return RunRetention.of({ prune, days })
  })
