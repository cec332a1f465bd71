/**
 * The Migrator's steps on its own one-connection client: the migration lock, the ledger, and applying
 * one migration with bounded lock waits.
 *
 * Every statement runs with `lock_timeout` set (a startup parameter of the client, so a reconnect keeps
 * it). A DDL statement that waits for a lock queues every later writer of that table behind itself; a
 * short timeout makes a migration that meets a long query give way at once, and the statement is tried
 * again after a growing pause, a bounded number of times. Only a lock timeout (55P03) is retried: any
 * other failure, a lost connection above all (its session held the migration lock), stops the run.
 */
import { Effect, Schema } from "effect"
import type postgres from "postgres"
import { DatabaseError } from "./DatabaseError.ts"
import { type AppliedRow, concurrentIndexName, type JournalEntry, MigrationError } from "./migrationFiles.ts"

export const migrationsSchema = "drizzle"
export const migrationsTable = "__drizzle_migrations"

/** `pg_advisory_lock(int4, int4)` key of the migration lock: "rlmg" in ASCII, then 1. Never change it. */
export const migrationLockKey = [0x726c6d67, 1] as const

/** How often a migrator waiting for the migration lock asks for it again. */
const lockPollMs = 200

const lockNotAvailable = "55P03"

export interface MigrationLimits {
  /** `lock_timeout` of every statement the Migrator runs. */
  readonly lockTimeoutMs: number
  /** Tries of a statement (or a transactional migration) that met `lock_timeout`, the first included. */
  readonly attempts: number
  /** Pause after the first lock timeout; doubled after each further one. */
  readonly retryDelayMs: number
  /** How long a migrator waits for another to release the migration lock before it gives up. */
  readonly lockWaitMs: number
}

/** Another migrator held the migration lock for longer than `lockWaitMs`; `holder` says who. */
export class MigrationLockBusy extends Schema.TaggedError<MigrationLockBusy>()("MigrationLockBusy", {
  waitedMs: Schema.Number,
  holder: Schema.String,
  message: Schema.String
}) {}

const call = <A>(operation: string, f: () => PromiseLike<A>) =>
  Effect.tryPromise({ try: f, catch: (cause) => DatabaseError.fromCause(operation, cause) })

interface HolderRow {
  readonly pid: number
  readonly application_name: string | null
  readonly client: string | null
  readonly backend_start: string | null
  readonly state: string | null
  readonly query: string | null
}

/** Who holds the migration lock, in words, from pg_locks and pg_stat_activity. */
const describeHolder = (client: postgres.Sql) =>
  Effect.map(
    call("Migrator.lockHolder", () =>
      client<Array<HolderRow>>`
        select l.pid, a.application_name, coalesce(host(a.client_addr), 'a local socket') as client,
               a.backend_start::text as backend_start, a.state, left(a.query, 200) as query
          from pg_locks l left join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.granted
           and l.database = (select oid from pg_database where datname = current_database())
           and l.classid = ${migrationLockKey[0]}::int8::oid and l.objid = ${migrationLockKey[1]}::int8::oid
           and l.objsubid = 2`),
    (rows) => {
      const row = rows[0]
      if (row === undefined) return "a session that has released it since"
      return `backend pid ${row.pid} (application "${row.application_name ?? ""}", from ${row.client}, ` +
        `connected at ${row.backend_start}, ${row.state ?? "state unknown"}, last query: ${row.query ?? "unknown"})`
    }
  )

/** Takes the session-level migration lock, polling; after `waitMs` fails naming who holds it. */
export const acquireMigrationLock = (client: postgres.Sql, waitMs: number) =>
  Effect.gen(function*() {
    const started = Date.now()
    while (true) {
      const [row] = yield* call("Migrator.lock", () =>
        client<Array<{ locked: boolean }>>`
          select pg_try_advisory_lock(${migrationLockKey[0]}::int4, ${migrationLockKey[1]}::int4) as locked`)
      if (row?.locked === true) return
      const waited = Date.now() - started
      if (waited >= waitMs) {
        const holder = yield* describeHolder(client)
        return yield* new MigrationLockBusy({
          waitedMs: waited,
          holder,
          message: `waited ${waited} ms for the migration lock, held by ${holder}; ` +
            "wait for that migration to finish, or raise RUNLANE_MIGRATION_WAIT_MS"
        })
      }
      yield* Effect.sleep(Math.min(lockPollMs, waitMs - waited))
    }
  })

/** The ledger drizzle's own migrator keeps, so databases migrated by either stay compatible. */
export const ensureLedger = (client: postgres.Sql) =>
  call("Migrator.ledger", async () => {
    await client`create schema if not exists ${client(migrationsSchema)}`
    await client`
      create table if not exists ${client(migrationsSchema)}.${client(migrationsTable)}
        (id serial primary key, hash text not null, created_at bigint)`
  })

export const readApplied = async (sql: postgres.Sql): Promise<ReadonlyArray<AppliedRow>> => {
  const [ledger] = await sql<Array<{ exists: boolean }>>`
    select to_regclass(${`${migrationsSchema}.${migrationsTable}`}) is not null as exists`
  if (!ledger?.exists) return []
  return sql<Array<AppliedRow>>`
    select hash, created_at::text as created_at
      from ${sql(migrationsSchema)}.${sql(migrationsTable)}
     order by created_at`
}

const record = (sql: postgres.Sql | postgres.TransactionSql, entry: JournalEntry) =>
  sql`insert into ${sql(migrationsSchema)}.${sql(migrationsTable)} (hash, created_at) values (${entry.hash}, ${entry.when})`

/** Runs `attempt`, trying again after a lock timeout with a doubling pause, at most `limits.attempts` times. */
const withLockRetry = <A, E>(
  migration: string,
  limits: MigrationLimits,
  attempt: Effect.Effect<A, E | DatabaseError>
): Effect.Effect<A, E | DatabaseError | MigrationError> => {
  const loop = (tried: number): Effect.Effect<A, E | DatabaseError | MigrationError> =>
    Effect.catchIf(
      attempt,
      (error): error is DatabaseError => error instanceof DatabaseError && error.sqlState === lockNotAvailable,
      (error) => {
        if (tried >= limits.attempts) {
          return Effect.fail(new MigrationError({
            migration,
            message: `gave up on ${migration} after ${tried} tries, each waiting ${limits.lockTimeoutMs} ms ` +
              `for a lock (${error.message}); a long transaction holds a table it changes. Try again ` +
              "when it has ended, or raise RUNLANE_MIGRATION_LOCK_TIMEOUT_MS / RUNLANE_MIGRATION_ATTEMPTS"
          }))
        }
        const pause = limits.retryDelayMs * 2 ** (tried - 1)
        return Effect.logWarning("Migration statement gave way to a lock held by another session; trying again").pipe(
          Effect.annotateLogs({ migration, attempt: tried, pauseMs: pause, lockTimeoutMs: limits.lockTimeoutMs }),
          Effect.andThen(Effect.sleep(pause)),
          Effect.andThen(loop(tried + 1))
        )
      }
    )
  return loop(1)
}

/** `pg_index.indisvalid` of the index, or undefined when there is no such index. */
const indexValidity = (client: postgres.Sql, index: string) =>
  Effect.map(
    call("Migrator.indexValidity", () =>
      client<Array<{ valid: boolean }>>`select indisvalid as valid from pg_index where indexrelid = to_regclass(${index})`),
    (rows) => rows[0]?.valid
  )

/**
 * Drops the index a concurrent build left INVALID (interrupted, cancelled or timed out half way), so the
 * statement builds it again: an invalid index is never kept. `DROP INDEX CONCURRENTLY` takes no lock
 * that blocks readers or writers of the table.
 */
const dropInvalidIndex = (client: postgres.Sql, migration: string, index: string) =>
  Effect.gen(function*() {
    if ((yield* indexValidity(client, index)) !== false) return
    yield* Effect.logWarning("Dropping an index left invalid by an interrupted concurrent build; rebuilding it").pipe(
      Effect.annotateLogs({ migration, index })
    )
    yield* call("Migrator.dropInvalidIndex", () => client.unsafe(`drop index concurrently if exists ${index}`))
  })

const requireValidIndex = (client: postgres.Sql, migration: string, index: string) =>
  Effect.gen(function*() {
    if ((yield* indexValidity(client, index)) === false) {
      return yield* new MigrationError({ migration, message: `index ${index} is still invalid after its build` })
    }
  })

/**
 * Applies one migration and records it. An ordinary migration runs in its own transaction with its
 * ledger row (River's rivermigrate does the same): a failure leaves the migrations before it applied
 * and recorded, and a table's lock is held only for the length of one migration, never of the whole
 * run. A `no-transaction` migration runs statement by statement in autocommit and is recorded after its
 * last statement succeeded.
 */
/**
 * `lock_timeout` for the statements that follow: for the rest of a transaction, or for the session.
 * Set by statement, not as a startup parameter of the client, because PgBouncer refuses startup
 * parameters it does not know (session pooling is fine for migrations; see sessionPooling.ts). Set
 * again before every statement outside a transaction, so a reconnect in between cannot drop it.
 */
export const setLockTimeout = (
  client: postgres.Sql | postgres.TransactionSql,
  limits: Pick<MigrationLimits, "lockTimeoutMs">,
  scope: "transaction" | "session"
) =>
  client`select set_config('lock_timeout', ${`${limits.lockTimeoutMs}ms`}, ${scope === "transaction"})`

export const applyMigration = (client: postgres.Sql, entry: JournalEntry, limits: MigrationLimits) =>
  Effect.gen(function*() {
    if (entry.transactional) {
      return yield* withLockRetry(entry.tag, limits, call(`Migrator.apply ${entry.tag}`, () =>
        client.begin(async (tx) => {
          await setLockTimeout(tx, limits, "transaction")
          for (const statement of entry.statements) await tx.unsafe(statement)
          await record(tx, entry)
        })))
    }
    for (const statement of entry.statements) {
      const index = concurrentIndexName(statement)
      yield* withLockRetry(entry.tag, limits, Effect.gen(function*() {
        yield* call(`Migrator.apply ${entry.tag}`, () => setLockTimeout(client, limits, "session"))
        if (index !== undefined) yield* dropInvalidIndex(client, entry.tag, index)
        yield* call(`Migrator.apply ${entry.tag}`, () => client.unsafe(statement))
        if (index !== undefined) yield* requireValidIndex(client, entry.tag, index)
      }))
    }
    yield* call(`Migrator.record ${entry.tag}`, () => record(client, entry))
  }).pipe(Effect.annotateLogs({ migration: entry.tag }))
