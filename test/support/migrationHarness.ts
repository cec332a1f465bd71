/**
 * Migration tests: fixture folders of test migrations, an empty database per test, a Migrator over it,
 * and a plain client for holding locks and reading the catalogue.
 */
import { fileURLToPath } from "node:url"
import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { Migrator, type MigratorOptions } from "../../src/db/Migrator.ts"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "./testDatabase.ts"

/** A folder of test/db/fixtures: a drizzle-kit journal and SQL files, never the product's migrations. */
export const fixtureFolder = (name: string) => fileURLToPath(new URL(`../db/fixtures/${name}`, import.meta.url))

/** Runs `migrate` once with its own pool, as a separate process would. */
export const migrateOnce = (url: string, options: Partial<MigratorOptions>) =>
  Effect.gen(function*() {
    const migrator = yield* Migrator
    return yield* migrator.migrate
  }).pipe(
    Effect.provide(Migrator.layerWith(options).pipe(
      Layer.provide(Database.layerWith({ url: Redacted.make(url), poolMax: 2 }))
    ))
  )

/** An empty database and a one-connection client on it for the length of `f`; both dropped afterwards. */
export const withEmptyDatabase = <A, E, R>(f: (db: TestDatabaseHandle, client: postgres.Sql) => Effect.Effect<A, E, R>) =>
  Effect.acquireUseRelease(
    Effect.promise(async () => {
      const db = await createDatabase({ migrated: false })
      return { db, client: postgres(db.url, { max: 1, onnotice: () => {}, connection: { application_name: "migration test" } }) }
    }),
    ({ db, client }) => f(db, client),
    ({ db, client }) => Effect.promise(async () => {
      await client.end({ timeout: 5 })
      await dropDatabase(db.name)
    })
  )

export interface WaitingBackend {
  readonly pid: number
  readonly queryStart: string
}

/**
 * The migrator's backend while it waits on a lock running a statement that starts with `prefix`.
 * pg_stat_activity is read once per transaction and cached; the client may be inside one (holding a
 * lock), so the cache is cleared first.
 */
export const migratorWaiting = (client: postgres.Sql, prefix: string) =>
  Effect.map(
    Effect.promise(async () => {
      await client`select pg_stat_clear_snapshot()`
      return client<Array<WaitingBackend>>`
        select pid, query_start::text as "queryStart" from pg_stat_activity
         where datname = current_database() and application_name like 'runlane migrator%'
           and wait_event_type = 'Lock' and query ilike ${`${prefix}%`}`
    }),
    (rows) => rows[0]
  )
