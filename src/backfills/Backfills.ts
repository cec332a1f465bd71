/**
 * Backfills: named, resumable data changes too large for a migration's transaction, run by
 * `npm run db:backfill -- <name>` while the service keeps serving.
 *
 * A backfill walks its table by keyset (`id > last ORDER BY id LIMIT n`), each batch one short
 * transaction that also moves the checkpoint row (schema/backfills.ts), so locks are held for one batch
 * only and a stopped backfill resumes exactly after its last committed batch. The checkpoint row is
 * read FOR UPDATE, so two runners of the same backfill take turns instead of doing a batch twice. A rate
 * limit (rows per second) leaves the database room for its real traffic.
 */
import { Context, Effect, Layer, Schema } from "effect"
import type postgres from "postgres"
import { Database } from "../db/Database.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"
import type { Progress } from "../terminal/progressLine.ts"
import { runsLegacyScope } from "./runsLegacyScope.ts"

export interface BatchOutcome {
  /** The highest id the batch looked at (the next batch starts after it). */
  readonly lastId: number
  /** Rows the batch looked at; 0 means nothing is left after the checkpoint. */
  readonly looked: number
  readonly changed: number
}

export interface BackfillDefinition {
  readonly name: string
  readonly description: string
  /** Whether any row still needs this backfill (readiness asks; keep it an index probe). */
  readonly needed: (sql: postgres.Sql) => Promise<boolean>
  /** Rows left after `afterId`, for the progress bar. */
  readonly remaining: (sql: postgres.Sql, afterId: number) => Promise<number>
  /** One keyset batch inside the runner's transaction. */
  readonly batch: (tx: postgres.TransactionSql, afterId: number, limit: number) => Promise<BatchOutcome>
}

/** Every backfill `npm run db:backfill` knows, by name. */
export const backfillDefinitions: ReadonlyArray<BackfillDefinition> = [runsLegacyScope]

/**
 * Backfills the running code relies on: readiness (/health/ready) answers 503 while one of them has
 * rows left and has not finished. runs_legacy_scope: until it has run, rows of older writers are owned
 * through their payload (see RunOwnership).
 */
export const requiredBackfills: ReadonlyArray<string> = [runsLegacyScope.name]

/**
 * Names of required backfills that still have rows to do and have not finished. A plain function over
 * the pool so readiness can ask through the Migrator (the database is ready when both its schema and its
 * data are where the code needs them) without one more service behind the HTTP layer.
 */
export const unfinishedBackfills = async (sql: postgres.Sql): Promise<ReadonlyArray<string>> => {
  const names: Array<string> = []
  for (const name of requiredBackfills) {
    const definition = backfillDefinitions.find((candidate) => candidate.name === name)!
    const [row] = await sql<Array<CheckpointRow>>`
      select last_id::text, finished_at from runlane_backfills where name = ${name}`
    if (row?.finished_at != null) continue
    if (await definition.needed(sql)) names.push(name)
  }
  return names
}

export class UnknownBackfill extends Schema.TaggedError<UnknownBackfill>()("UnknownBackfill", {
  name: Schema.String,
  message: Schema.String
}) {}

export interface BackfillOptions {
  /** Rows per batch (one transaction each). Defaults to 1000. */
  readonly batchSize: number
  /** At most this many rows per second, on average; 0 for no limit. Defaults to 5000. */
  readonly rowsPerSecond: number
  /** Called after each batch. */
  readonly onProgress: (progress: Progress) => void
}

/**
 * 1000 rows per batch keeps each transaction's row locks to a fraction of a second. 5000 rows per second
 * finishes 10 million rows in about 35 minutes and keeps a backfill on a fast server from taking more
 * than its share of WAL and vacuum; unlimited, one loop reached ~6,000 rows/s on the loaded 2-core
 * bench machine (docs/migrations.md), so there the limit barely bites.
 */
export const backfillDefaults: BackfillOptions = { batchSize: 1000, rowsPerSecond: 5000, onProgress: () => {} }

export interface BackfillReport {
  readonly name: string
  /** Rows looked at, changed and skipped by this run. */
  readonly done: number
  readonly changed: number
  readonly skipped: number
  /** The checkpoint when the run ended. */
  readonly lastId: number
  readonly finished: boolean
}

interface CheckpointRow {
  readonly last_id: string
  readonly finished_at: Date | null
}

export class Backfills extends Context.Service<Backfills, {
  /** Runs the named backfill from its checkpoint to the end of its table. */
  readonly run: (
    name: string,
    options?: Partial<BackfillOptions>
  ) => Effect.Effect<BackfillReport, UnknownBackfill | DatabaseError>
  /** Runs a backfill defined by the caller (an application's own data change; the bench's). */
  readonly runDefinition: (
    definition: BackfillDefinition,
    options?: Partial<BackfillOptions>
  ) => Effect.Effect<BackfillReport, DatabaseError>
  /** Names of required backfills that still have rows to do and have not finished. */
  readonly unfinished: Effect.Effect<ReadonlyArray<string>, DatabaseError>
}>()("runlane/Backfills") {
  static readonly layer = Layer.effect(
    Backfills,
    Effect.gen(function*() {
      const database = yield* Database

      const checkpoint = (name: string) =>
        database.use("Backfills.checkpoint", (sql) =>
          sql<Array<CheckpointRow>>`select last_id::text, finished_at from runlane_backfills where name = ${name}`)

      const runDefinition = Effect.fn("Backfills.runDefinition")(function*(
        definition: BackfillDefinition,
        given?: Partial<BackfillOptions>
      ) {
        const name = definition.name
        const options = { ...backfillDefaults, ...given }
        yield* database.use("Backfills.start", (sql) =>
          sql`insert into runlane_backfills (name) values (${name}) on conflict (name) do nothing`)
        const [start] = yield* checkpoint(name)
        const total = yield* database.use("Backfills.remaining", (sql) => definition.remaining(sql, Number(start!.last_id)))
        const started = Date.now()
        let done = 0
        let changed = 0
        let lastId = Number(start!.last_id)
        while (true) {
          const outcome = yield* database.use("Backfills.batch", (sql) =>
            sql.begin(async (tx) => {
              const [row] = await tx<Array<{ last_id: string }>>`
                select last_id::text from runlane_backfills where name = ${name} for update`
              const result = await definition.batch(tx, Number(row!.last_id), options.batchSize)
              await tx`
                update runlane_backfills
                   set last_id = ${result.lastId}, rows_done = rows_done + ${result.looked},
                       rows_changed = rows_changed + ${result.changed},
                       rows_skipped = rows_skipped + ${result.looked - result.changed},
                       updated_at = now(),
                       finished_at = case when ${result.looked} = 0 then now() end
                 where name = ${name}`
              return result
            }))
          done += outcome.looked
          changed += outcome.changed
          lastId = outcome.lastId
          options.onProgress({ done, total, elapsedMs: Date.now() - started })
          if (outcome.looked === 0) break
          if (options.rowsPerSecond > 0) {
            const due = (done * 1000) / options.rowsPerSecond - (Date.now() - started)
            if (due > 0) yield* Effect.sleep(due)
          }
        }
        return { name, done, changed, skipped: done - changed, lastId, finished: true }
      })

      const run = (name: string, given?: Partial<BackfillOptions>) => {
        const definition = backfillDefinitions.find((candidate) => candidate.name === name)
        if (definition === undefined) {
          return Effect.fail(new UnknownBackfill({
            name,
            message: `no backfill named "${name}"; known: ${backfillDefinitions.map((known) => known.name).join(", ")}`
          }))
        }
        return runDefinition(definition, given)
      }

      const unfinished = database.use("Backfills.unfinished", unfinishedBackfills).pipe(
        Effect.withSpan("Backfills.unfinished")
      )

      return Backfills.of({ run, runDefinition, unfinished })
    })
  )
}
