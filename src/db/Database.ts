/**
 * Database: the process's one postgres.js pool and a Drizzle instance over it.
 *
 * Every other service reaches PostgreSQL through this one. The pool is ended with a bounded wait when
 * the layer closes: postgres.js `end()` without a timeout can hang after a `reserve()` (porsager/postgres#925).
 */
import { drizzle, type PostgresJsDatabase } from "drizzle-orm/postgres-js"
import { Config, Context, Effect, Layer, Redacted, Schema } from "effect"
import postgres from "postgres"
import * as schema from "../schema/index.ts"
import { DatabaseError } from "./DatabaseError.ts"

export type RunlaneDrizzle = PostgresJsDatabase<typeof schema>

export interface DatabaseOptions {
  readonly url: Redacted.Redacted<string>
  /** Connections in the pool. Defaults to 20. */
  readonly poolMax?: number
}

/** Seconds `sql.end()` may wait for running queries when the layer closes before connections are cut. */
const poolEndTimeoutSeconds = 5

/** `DB_POOL_MAX`: connections in the pool, a whole number from 1 to 10,000. Defaults to 20. */
export const poolMaxConfig = Config.schema(
  Schema.Int.check(Schema.isBetween({ minimum: 1, maximum: 10_000 })),
  "DB_POOL_MAX"
).pipe(Config.withDefault(20))

export class Database extends Context.Service<Database, {
  /** The pool. Tagged-template queries on it are prepared once per connection and reused. */
  readonly sql: postgres.Sql
  readonly db: RunlaneDrizzle
  readonly poolMax: number
  readonly url: Redacted.Redacted<string>
  /** Runs one promise-returning database call, turning whatever it throws into a `DatabaseError`. */
  readonly use: <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) => Effect.Effect<A, DatabaseError>
}>()("runlane/Database") {
  /** A pool for an explicit URL (tests, the embedded server, applications with their own configuration). */
  static readonly layerWith = (options: DatabaseOptions) => Layer.effect(Database, make(options))

  /** A pool configured from `DATABASE_URL` (required) and `DB_POOL_MAX`. */
  static readonly layer = Layer.effect(
    Database,
    Effect.gen(function*() {
      const url = yield* Config.Redacted("DATABASE_URL")
      const poolMax = yield* poolMaxConfig
      return yield* make({ url, poolMax })
    })
  )
}

const make = Effect.fnUntraced(function*(options: DatabaseOptions) {
  const poolMax = options.poolMax ?? 20
  const sql = yield* Effect.acquireRelease(
    Effect.sync(() =>
      postgres(Redacted.value(options.url), {
        max: poolMax,
        // NOTICEs such as "relation already exists, skipping" are not errors and would only add noise.
        onnotice: () => {},
        connection: { application_name: "runlane" }
      })
    ),
    (sql) => Effect.promise(() => sql.end({ timeout: poolEndTimeoutSeconds }))
  )
  // Drizzle patches the pool's serializers (jsonb parameters pass through as text); every query
  // in runlane binds JSON as text cast by the server, so it is encoded exactly once either way.
  const db = drizzle(sql, { schema })
  const use = <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) =>
    Effect.tryPromise({ try: () => f(sql), catch: (cause) => DatabaseError.fromCause(operation, cause) })
  return Database.of({ sql, db, poolMax, url: options.url, use })
})
