/**
 * Migrator: applies the drizzle-kit migrations in `drizzle/` and reports which are pending.
 *
 * Drizzle's own migrator has three traps this service closes:
 * - concurrent migrators race (duplicate pg_namespace/pg_type rows): here every migration run holds a
 *   session advisory lock on a dedicated one-connection client, so lock, migrations and unlock share a backend;
 * - it silently skips a migration whose journal `when` is older than the last applied one (a merge of
 *   two branches): here that, and a migration file edited after it was applied, stop the run with a
 *   `MigrationError` naming the migration;
 * - it runs every pending migration in one transaction, so `CREATE INDEX CONCURRENTLY` cannot live in
 *   a migration; steps that must run outside a transaction belong to a later, separate phase.
 */
import { createHash } from "node:crypto"
import { readFileSync } from "node:fs"
import { fileURLToPath } from "node:url"
import { drizzle } from "drizzle-orm/postgres-js"
import { migrate as drizzleMigrate } from "drizzle-orm/postgres-js/migrator"
import { Context, Effect, Layer, Redacted, Schema } from "effect"
import postgres from "postgres"
import { Database } from "./Database.ts"
import { DatabaseError } from "./DatabaseError.ts"

export const migrationsFolder = fileURLToPath(new URL("../../drizzle", import.meta.url))
const migrationsSchema = "drizzle"
const migrationsTable = "__drizzle_migrations"

/** `pg_advisory_lock(int4, int4)` key of the migration lock: "rlmg" in ASCII, then 1. Never change it. */
export const migrationLockKey = [0x726c6d67, 1] as const

export class MigrationError extends Schema.TaggedError<MigrationError>()("MigrationError", {
  migration: Schema.String,
  message: Schema.String
}) {}

export interface JournalEntry {
  readonly tag: string
  readonly when: number
  readonly hash: string
}

export interface MigrationStatus {
  /** Tags of the migrations recorded as applied, oldest first. */
  readonly applied: ReadonlyArray<string>
  /** Tags that `migrate` would apply, oldest first. */
  readonly pending: ReadonlyArray<string>
}

export interface MigrationReport {
  /** Tags this call applied (empty when another process had already applied them). */
  readonly appliedNow: ReadonlyArray<string>
  readonly status: MigrationStatus
}

/** Reads the journal and hashes each file exactly as drizzle's migrator does (sha256 of the whole file). */
export const readJournal = (folder: string = migrationsFolder): ReadonlyArray<JournalEntry> => {
  const journal = JSON.parse(readFileSync(`${folder}/meta/_journal.json`, "utf8")) as {
    entries: ReadonlyArray<{ tag: string; when: number }>
  }
  return journal.entries.map((entry) => ({
    tag: entry.tag,
    when: entry.when,
    hash: createHash("sha256").update(readFileSync(`${folder}/${entry.tag}.sql`, "utf8")).digest("hex")
  }))
}

interface AppliedRow {
  readonly hash: string
  readonly created_at: string
}

/**
 * Compares the journal with the ledger. Pure, so the refusal rules are tested without a database.
 * Fails when a journal entry is older than the newest applied one but was never applied (drizzle would
 * skip it forever), or when an applied migration's file no longer hashes to what was applied.
 */
export const compareJournal = (
  journal: ReadonlyArray<JournalEntry>,
  appliedRows: ReadonlyArray<AppliedRow>
): MigrationStatus | MigrationError => {
  for (let i = 1; i < journal.length; i++) {
    if (journal[i]!.when <= journal[i - 1]!.when) {
      return new MigrationError({
        migration: journal[i]!.tag,
        message: `journal entry ${journal[i]!.tag} is not newer than ${journal[i - 1]!.tag}; regenerate it`
      })
    }
  }
  const appliedByTime = new Map(appliedRows.map((row) => [Number(row.created_at), row.hash]))
  const lastApplied = Math.max(0, ...appliedByTime.keys())
  const applied: Array<string> = []
  const pending: Array<string> = []
  for (const entry of journal) {
    const appliedHash = appliedByTime.get(entry.when)
    if (entry.when > lastApplied) {
      pending.push(entry.tag)
    } else if (appliedHash === undefined) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} is dated before the last applied migration and was never applied`
      })
    } else if (appliedHash !== entry.hash) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} was edited after it was applied; add a new migration instead`
      })
    } else {
      applied.push(entry.tag)
    }
  }
  return { applied, pending }
}

const readApplied = async (sql: postgres.Sql): Promise<ReadonlyArray<AppliedRow>> => {
  const [ledger] = await sql<Array<{ exists: boolean }>>`
    select to_regclass(${`${migrationsSchema}.${migrationsTable}`}) is not null as exists`
  if (!ledger?.exists) return []
  return sql<Array<AppliedRow>>`
    select hash, created_at::text as created_at
      from ${sql(migrationsSchema)}.${sql(migrationsTable)}
     order by created_at`
}

export class Migrator extends Context.Service<Migrator, {
  /** Applies pending migrations under the migration lock; safe to call from many processes at once. */
  readonly migrate: Effect.Effect<MigrationReport, MigrationError | DatabaseError>
  /** Applied and pending migrations, read through the pool (serves readiness checks). */
  readonly status: Effect.Effect<MigrationStatus, MigrationError | DatabaseError>
}>()("runlane/Migrator") {
  static readonly layer = Layer.effect(
    Migrator,
    Effect.gen(function*() {
      const database = yield* Database
      const journal = readJournal()

      const status = Effect.flatMap(
        database.use("Migrator.status", readApplied),
        (rows) => toEffect(compareJournal(journal, rows))
      ).pipe(Effect.withSpan("Migrator.status"))

      const migrate = Effect.acquireUseRelease(
        // max: 1 keeps the lock, the migrations and the unlock on one backend.
        Effect.sync(() => postgres(Redacted.value(database.url), { max: 1, onnotice: () => {} })),
        (client) =>
          Effect.gen(function*() {
            const call = <A>(f: () => PromiseLike<A>) =>
              Effect.tryPromise({ try: f, catch: (cause) => DatabaseError.fromCause("Migrator.migrate", cause) })
            yield* call(() => client`select pg_advisory_lock(${migrationLockKey[0]}::int4, ${migrationLockKey[1]}::int4)`)
            const before = yield* toEffect(compareJournal(journal, yield* call(() => readApplied(client))))
            if (before.pending.length > 0) {
              yield* call(() => drizzleMigrate(drizzle(client), { migrationsFolder, migrationsSchema, migrationsTable }))
            }
            const after = yield* toEffect(compareJournal(journal, yield* call(() => readApplied(client))))
            return { appliedNow: before.pending, status: after }
          }),
        // Ending the client closes its session, which drops the advisory lock even if the unlock never ran.
        (client) => Effect.promise(() => client.end({ timeout: 5 }))
      ).pipe(Effect.withSpan("Migrator.migrate"))

      return Migrator.of({ migrate, status })
    })
  )
}

const toEffect = <A>(result: A | MigrationError): Effect.Effect<A, MigrationError> =>
  result instanceof MigrationError ? Effect.fail(result) : Effect.succeed(result)
