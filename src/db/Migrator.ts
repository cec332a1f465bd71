/**
 * Migrator: applies the drizzle-kit migrations of a folder (`drizzle/` by default) and reports which are
 * pending.
 *
 * Drizzle's own migrator has four traps this one closes:
 * - concurrent migrators race (duplicate pg_namespace/pg_type rows): here every run holds a session
 *   advisory lock on a dedicated one-connection client, so lock, migrations and unlock share a backend;
 *   a migrator waits for that lock a bounded time and then names who holds it;
 * - it silently skips a migration whose journal `when` is older than the last applied one (a merge of
 *   two branches): here that, and a migration file edited after it was applied, stop the run with a
 *   `MigrationError` naming the migration;
 * - it runs every pending migration in one transaction, so `CREATE INDEX CONCURRENTLY` cannot live in a
 *   migration (drizzle-orm #860): here each migration has its own transaction, and a file marked
 *   `-- runlane:no-transaction` runs outside any (migrationFiles.ts), still under the lock, in order;
 * - its DDL waits for locks without bound: here every statement runs under `lock_timeout` and is tried
 *   again a bounded number of times (migrationSteps.ts).
 * And behind a transaction pooler the migration lock would strand on a server session nobody controls:
 * the migrator first checks that its connection keeps one server session (sessionPooling.ts).
 */
import { hostname } from "node:os"
import { fileURLToPath } from "node:url"
import { Config, Context, Effect, Layer, Redacted, Schema } from "effect"
import postgres from "postgres"
import { unfinishedBackfills as unfinishedRequiredBackfills } from "../backfills/Backfills.ts"
import { Database } from "./Database.ts"
import { DatabaseError } from "./DatabaseError.ts"
import * as MigrationFiles from "./migrationFiles.ts"
import { assertSessionPooling, type SessionPoolingRequired } from "./sessionPooling.ts"
import { type MigrationError, type MigrationStatus } from "./migrationFiles.ts"
import {
  acquireMigrationLock,
  applyMigration,
  ensureLedger,
  type MigrationLimits,
  type MigrationLockBusy,
  readApplied,
  setLockTimeout
} from "./migrationSteps.ts"

export { compareJournal, type JournalEntry, MigrationError, type MigrationStatus, noTransactionMarker } from "./migrationFiles.ts"
export { migrationLockKey, MigrationLockBusy } from "./migrationSteps.ts"

/** Bound on the start-up check that the migrator's connection keeps one server session. */
const sessionProbeTimeoutMs = 5_000

export const migrationsFolder = fileURLToPath(new URL("../../drizzle", import.meta.url))

/** The journal of a migrations folder, the product's by default. */
export const readJournal = (folder: string = migrationsFolder) => MigrationFiles.readJournal(folder)

export interface MigrationReport {
  /** Tags this call applied (empty when another process had already applied them). */
  readonly appliedNow: ReadonlyArray<string>
  readonly status: MigrationStatus
}

export interface MigratorOptions extends MigrationLimits {
  /** The drizzle-kit output folder. Defaults to the product's `drizzle/`. */
  readonly folder: string
}

/**
 * `lockTimeoutMs` 5 s: long enough for the brief ACCESS EXCLUSIVE of an ADD COLUMN to get through the
 * usual sub-second traffic, short enough that writers queued behind a waiting DDL stall for 5 s at most.
 * 5 tries with pauses of 0.5, 1, 2 and 4 s give way to a long query for up to ~32 s before giving up.
 * `lockWaitMs` 60 s: a second service starting during a migration waits that long, then fails naming
 * the holder (its supervisor restarts it).
 */
export const migratorDefaults: MigratorOptions = {
  folder: migrationsFolder,
  lockTimeoutMs: 5_000,
  attempts: 5,
  retryDelayMs: 500,
  lockWaitMs: 60_000
}

const positiveInt = (name: string, fallback: number) =>
  Config.schema(Schema.Int.check(Schema.isGreaterThan(0)), name).pipe(Config.withDefault(fallback))

/**
 * From the environment: `RUNLANE_MIGRATION_LOCK_TIMEOUT_MS` (defaults to 5000),
 * `RUNLANE_MIGRATION_ATTEMPTS` (defaults to 5), `RUNLANE_MIGRATION_WAIT_MS` (defaults to 60000); each
 * a whole number above 0, or the service stops at start naming the variable.
 */
export const migratorConfig = Config.all({
  lockTimeoutMs: positiveInt("RUNLANE_MIGRATION_LOCK_TIMEOUT_MS", migratorDefaults.lockTimeoutMs),
  attempts: positiveInt("RUNLANE_MIGRATION_ATTEMPTS", migratorDefaults.attempts),
  lockWaitMs: positiveInt("RUNLANE_MIGRATION_WAIT_MS", migratorDefaults.lockWaitMs)
})

const toEffect = <A>(result: A | MigrationError): Effect.Effect<A, MigrationError> =>
  result instanceof MigrationFiles.MigrationError ? Effect.fail(result) : Effect.succeed(result)

const make = (options: MigratorOptions) =>
  Effect.gen(function*() {
    const database = yield* Database
    const journal = MigrationFiles.readJournal(options.folder)

    const status = Effect.flatMap(
      database.use("Migrator.status", readApplied),
      (rows) => toEffect(MigrationFiles.compareJournal(journal, rows))
    ).pipe(Effect.withSpan("Migrator.status"))

    const migrate = Effect.acquireUseRelease(
      // max: 1 keeps the lock, the migrations and the unlock on one backend; application_name is what a
      // waiting migrator reports. lock_timeout is set by statement (setLockTimeout).
      Effect.sync(() =>
        postgres(Redacted.value(database.url), {
          max: 1,
          onnotice: () => {},
          connection: { application_name: `runlane migrator (pid ${process.pid} on ${hostname()})` }
        })
      ),
      (client) =>
        Effect.gen(function*() {
          // The migration lock is a session advisory lock: behind a transaction pooler it would strand.
          const [own] = yield* Effect.tryPromise({
            try: () => client<Array<{ pid: number }>>`select pg_backend_pid() as pid`,
            catch: (cause) => DatabaseError.fromCause("Migrator.migrate", cause)
          })
          yield* assertSessionPooling(
            "migrations",
            { pid: own!.pid, query: (f) => Promise.resolve(f(client)) },
            database.sql,
            sessionProbeTimeoutMs
          )
          yield* Effect.tryPromise({
            try: () => setLockTimeout(client, options, "session"),
            catch: (cause) => DatabaseError.fromCause("Migrator.migrate", cause)
          })
          yield* acquireMigrationLock(client, options.lockWaitMs)
          yield* ensureLedger(client)
          const read = Effect.tryPromise({
            try: () => readApplied(client),
            catch: (cause) => DatabaseError.fromCause("Migrator.migrate", cause)
          })
          const before = yield* toEffect(MigrationFiles.compareJournal(journal, yield* read))
          for (const tag of before.pending) {
            yield* applyMigration(client, journal.find((entry) => entry.tag === tag)!, options)
            yield* Effect.logInfo("Migration applied").pipe(Effect.annotateLogs({ migration: tag }))
          }
          const after = yield* toEffect(MigrationFiles.compareJournal(journal, yield* read))
          return { appliedNow: before.pending, status: after }
        }),
      // Ending the client closes its session, which drops the advisory lock even if the unlock never ran.
      (client) => Effect.promise(() => client.end({ timeout: 5 }))
    ).pipe(Effect.withSpan("Migrator.migrate"))

    const unfinishedBackfills = database.use("Migrator.unfinishedBackfills", unfinishedRequiredBackfills).pipe(
      Effect.withSpan("Migrator.unfinishedBackfills")
    )

    return Migrator.of({ migrate, status, unfinishedBackfills })
  })

export class Migrator extends Context.Service<Migrator, {
  /**
   * Applies pending migrations in order under the migration lock; safe to call from many processes at
   * once (each migration is applied once; the others wait, then find nothing pending).
   */
  readonly migrate: Effect.Effect<MigrationReport, MigrationError | MigrationLockBusy | SessionPoolingRequired | DatabaseError>
  /** Applied and pending migrations, read through the pool (serves the start-up gate and readiness). */
  readonly status: Effect.Effect<MigrationStatus, MigrationError | DatabaseError>
  /**
   * Required backfills (backfills/Backfills.ts) that have rows left and have not finished: readiness
   * waits for them as it waits for migrations. Needs a migrated database.
   */
  readonly unfinishedBackfills: Effect.Effect<ReadonlyArray<string>, DatabaseError>
}>()("runlane/Migrator") {
  /** The product's migrations, with limits from the environment (`migratorConfig`). */
  static readonly layer = Layer.effect(
    Migrator,
    Effect.flatMap(migratorConfig, (limits) => make({ ...migratorDefaults, ...limits }))
  )

  /** Explicit options over `migratorDefaults` (tests use a fixture folder and short timeouts). */
  static readonly layerWith = (options: Partial<MigratorOptions>) =>
    Layer.effect(Migrator, make({ ...migratorDefaults, ...options }))
}
