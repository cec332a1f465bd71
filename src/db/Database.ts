/**
 * Database: the process's one postgres.js pool and a Drizzle instance over it.
 *
 * Every other service reaches PostgreSQL through this one. The pool is ended with a bounded wait when
 * the layer closes: postgres.js `end()` without a timeout can hang after a `reserve()` (porsager/postgres#925).
 */
import { randomUUID } from "node:crypto"
import { drizzle, type PostgresJsDatabase } from "drizzle-orm/postgres-js"
import { Config, Context, Effect, Layer, Redacted, Schema, type Scope } from "effect"
import postgres from "postgres"
import * as schema from "../schema/index.ts"
import { DatabaseError } from "./DatabaseError.ts"
import { ConnectionTracker, type PinnedConnection, withinMs } from "./pinnedConnection.ts"
import { makePinnedConnections, PinnedConnections } from "./PinnedConnections.ts"
import { PoolExhausted } from "./PoolExhausted.ts"
import { applicationNameOf } from "./postgresJsInternals.ts"

export type RunlaneDrizzle = PostgresJsDatabase<typeof schema>

export interface DatabaseOptions {
  readonly url: Redacted.Redacted<string>
  /** Connections in the pool. Defaults to 20. */
  readonly poolMax?: number
}

export { PoolExhausted }

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
  /** `application_name` of this pool's sessions ("runlane:" and a per-process UUID), when runlane made the pool. */
  readonly applicationName: string | undefined
  /** Runs one promise-returning database call, turning whatever it throws into a `DatabaseError`. */
  readonly use: <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) => Effect.Effect<A, DatabaseError>
  /**
   * Pins one pool connection to the caller's scope, waiting at most `timeoutMs` (postgres.js alone
   * waits forever and cannot be cancelled: a connection that arrives after the timeout, or after the
   * caller was interrupted, goes straight back). Returned to the pool when the scope closes, so the
   * caller must leave no session state behind (or end the session itself).
   */
  readonly reserve: (timeoutMs: number) => Effect.Effect<PinnedConnection, PoolExhausted | DatabaseError, Scope.Scope>
}>()("runlane/Database") {
  /** A pool for an explicit URL (tests, the embedded server, applications with their own configuration). */
  static readonly layerWith = (options: DatabaseOptions) => Layer.effectContext(make(options, undefined))

  /**
   * A Database over a postgres.js pool the caller created (and ends). runlane installs its `debug`
   * and `onclose` hooks on it, chained to any the caller set, and patches it for Drizzle.
   */
  static readonly layerFromClient = (client: postgres.Sql, options: DatabaseOptions) =>
    Layer.effectContext(make(options, client))

  /** A pool configured from `DATABASE_URL` (required) and `DB_POOL_MAX`. */
  static readonly layer = Layer.effectContext(
    Effect.gen(function*() {
      const url = yield* Config.Redacted("DATABASE_URL")
      const poolMax = yield* poolMaxConfig
      return yield* make({ url, poolMax }, undefined)
    })
  )
}

/** Database and, for runlane's own pinning (locks, probes), PinnedConnections over the same pool. */
const make = Effect.fnUntraced(function*(options: DatabaseOptions, client: postgres.Sql | undefined) {
  const poolMax = options.poolMax ?? 20
  const applicationName = client === undefined ? `runlane:${randomUUID()}` : applicationNameOf(client)
  const sql = client ?? (yield* Effect.acquireRelease(
    Effect.sync(() =>
      postgres(Redacted.value(options.url), {
        max: poolMax,
        // NOTICEs such as "relation already exists, skipping" are not errors and would only add noise.
        onnotice: () => {},
        connection: { application_name: applicationName! }
      })
    ),
    (sql) =>
      Effect.promise(() => sql.end({ timeout: poolEndTimeoutSeconds })).pipe(
        Effect.andThen(Effect.logInfo("Database pool closed"))
      )
  ))
  const tracker = new ConnectionTracker(sql)
  // Drizzle patches the pool's serializers (jsonb parameters pass through as text); every query
  // in runlane binds JSON as text cast by the server, so it is encoded exactly once either way.
  const db = drizzle(sql, { schema })
  const use = <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) =>
    Effect.tryPromise({ try: () => f(sql), catch: (cause) => DatabaseError.fromCause(operation, cause) })
  const pins = makePinnedConnections({ sql, tracker, poolMax, url: options.url, applicationName })
  const reserve = (timeoutMs: number) =>
    Effect.acquireRelease(
      Effect.callback<PinnedConnection, PoolExhausted | DatabaseError>((resume) => {
        const pending = pins.pin(timeoutMs, undefined, {
          // The identifying query is bounded too: a session that does not answer is ended, never kept.
          onPinned: (pinned) =>
            withinMs(pinned.firstRow, timeoutMs).then(
              () => resume(Effect.succeed(pinned)),
              (cause: unknown) => {
                void pinned.terminate(pins.terminateBackend, timeoutMs)
                resume(Effect.fail(DatabaseError.fromCause("Database.reserve", cause)))
              }
            ),
          onFailed: (error) => resume(Effect.fail(error))
        })
        // Interrupted while waiting: a late connection goes straight back. Once pinned, the
        // identifying query answers within moments and the release below returns it.
        return Effect.sync(() => void pending.abandon())
      }),
      (pinned) => Effect.sync(() => pinned.release())
    )
  return Context.make(Database, Database.of({ sql, db, poolMax, url: options.url, applicationName, use, reserve }))
    .pipe(Context.add(PinnedConnections, pins))
})
