/**
 * Database: the process's one postgres.js pool and a Drizzle instance over it.
 *
 * Every other service reaches PostgreSQL through this one. The pool is ended with a bounded wait when
 * the layer closes: postgres.js `end()` without a timeout can hang after a `reserve()` (porsager/postgres#925).
 */
import { randomUUID } from "node:crypto"
import { drizzle, type PostgresJsDatabase } from "drizzle-orm/postgres-js"
import { Config, Context, Effect, Layer, Redacted, Schema } from "effect"
import postgres from "postgres"
import * as schema from "../schema/index.ts"
import { DatabaseError } from "./DatabaseError.ts"
import { ConnectionTracker, type FirstQuery, type PinnedConnection } from "./pinnedConnection.ts"

export type RunlaneDrizzle = PostgresJsDatabase<typeof schema>

export interface DatabaseOptions {
  readonly url: Redacted.Redacted<string>
  /** Connections in the pool. Defaults to 20. */
  readonly poolMax?: number
}

export interface PendingPin {
  readonly promise: Promise<PinnedConnection>
  /**
   * Stops waiting: the promise then never settles, and a late connection goes straight back. Answers
   * false when the promise had already settled (its handlers will still run).
   */
  abandon(): boolean
}

/**
 * One `pin` in flight: waits for `sql.reserve()` at most `timeoutMs`, then pins the connection in the
 * very callback it arrives in (so the identifying query is written before postgres.js can process a
 * close of that connection, see pinnedConnection.ts). A class rather than closures: pins are a hot
 * path of conversation locks.
 */
class PendingReservation implements PendingPin {
  readonly promise: Promise<PinnedConnection>
  private settled = false
  private timer: ReturnType<typeof setTimeout> | undefined = undefined
  private resolve!: (pinned: PinnedConnection) => void
  private reject!: (error: PoolExhausted | DatabaseError) => void

  constructor(
    sql: postgres.Sql,
    tracker: ConnectionTracker,
    timeoutMs: number,
    poolMax: number,
    first: FirstQuery | undefined
  ) {
    this.promise = new Promise<PinnedConnection>((resolve, reject) => {
      this.resolve = resolve
      this.reject = reject
    })
    this.timer = setTimeout(() => {
      if (this.settle()) this.reject(new PoolExhausted({ timeoutMs, poolMax }))
    }, timeoutMs)
    sql.reserve().then(
      (reserved) => {
        // Nobody waits for it any more; it never ran a query, so it goes straight back.
        if (!this.settle()) return releaseQuietly(reserved)
        let pinned: PinnedConnection
        try {
          pinned = tracker.pin(reserved, first)
        } catch (cause) {
          // The first query could not even be built, so nothing was sent on the connection.
          releaseQuietly(reserved)
          return this.reject(DatabaseError.fromCause("Database.reserve", cause))
        }
        this.resolve(pinned)
      },
      (cause: unknown) => {
        if (this.settle()) this.reject(DatabaseError.fromCause("Database.reserve", cause))
      }
    )
  }

  abandon(): boolean {
    return this.settle()
  }

  /** true for the first caller only: the one that decides how the pin ends. */
  private settle(): boolean {
    if (this.settled) return false
    this.settled = true
    clearTimeout(this.timer)
    return true
  }
}

/** No pool connection became free for a pinned holder within the reserve timeout. */
export class PoolExhausted extends Schema.TaggedError<PoolExhausted>()("PoolExhausted", {
  timeoutMs: Schema.Number,
  poolMax: Schema.Number
}) {}

/** Seconds the one-off connection of `terminateBackend` may take to connect. */
const terminateConnectTimeoutSeconds = 5

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
  /** `application_name` of this pool's sessions: "runlane:" and a per-process UUID. */
  readonly applicationName: string
  /** Runs one promise-returning database call, turning whatever it throws into a `DatabaseError`. */
  readonly use: <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) => Effect.Effect<A, DatabaseError>
  /**
   * Pins one pool connection to the caller, waiting at most `timeoutMs` (postgres.js alone waits
   * forever and cannot be cancelled: a reservation that arrives after the timeout, or after the caller
   * was interrupted, is released at once). The caller must `release` or `destroy` it, and await
   * `ready` before relying on its `pid`.
   */
  readonly reserve: (timeoutMs: number) => Effect.Effect<PinnedConnection, PoolExhausted | DatabaseError>
  /**
   * `reserve` as a promise, for hot paths that keep several steps inside one asynchronous boundary.
   * Rejects with PoolExhausted or DatabaseError. `abandon()` gives up waiting: a connection that arrives
   * later is released at once. `first`, when given, is sent as the identifying query (see FirstQuery),
   * saving a statement.
   */
  readonly pin: (timeoutMs: number, first?: FirstQuery) => PendingPin
  /**
   * `pg_terminate_backend(pid)` on a one-off connection outside the pool, so it works when every
   * pool connection is pinned. For ending pinned sessions that cannot be trusted back in the pool.
   */
  readonly terminateBackend: (pid: number) => Promise<boolean>
}>()("runlane/Database") {
  /** A pool for an explicit URL (tests, the embedded server, applications with their own configuration). */
  static readonly layerWith = (options: DatabaseOptions) => Layer.effect(Database, make(options, undefined))

  /**
   * A Database over a postgres.js pool the caller created (and ends). runlane installs its `debug`
   * and `onclose` hooks on it, chained to any the caller set, and patches it for Drizzle.
   */
  static readonly layerFromClient = (client: postgres.Sql, options: DatabaseOptions) =>
    Layer.effect(Database, make(options, client))

  /** A pool configured from `DATABASE_URL` (required) and `DB_POOL_MAX`. */
  static readonly layer = Layer.effect(
    Database,
    Effect.gen(function*() {
      const url = yield* Config.Redacted("DATABASE_URL")
      const poolMax = yield* poolMaxConfig
      return yield* make({ url, poolMax }, undefined)
    })
  )
}

/**
 * For connections nobody waits for any more (the caller timed out or was interrupted): there is no one
 * to report a failed release to, and postgres.js's release is synchronous bookkeeping that has already
 * run when it throws.
 */
const releaseQuietly = (connection: { release(): void }) => {
  try {
    connection.release()
  } catch {
    // Nothing to do: see above.
  }
}

const make = Effect.fnUntraced(function*(options: DatabaseOptions, client: postgres.Sql | undefined) {
  const poolMax = options.poolMax ?? 20
  const applicationName = client === undefined
    ? `runlane:${randomUUID()}`
    : String((client.options as { connection?: { application_name?: unknown } }).connection?.application_name ?? "")
  const sql = client ?? (yield* Effect.acquireRelease(
    Effect.sync(() =>
      postgres(Redacted.value(options.url), {
        max: poolMax,
        // NOTICEs such as "relation already exists, skipping" are not errors and would only add noise.
        onnotice: () => {},
        connection: { application_name: applicationName }
      })
    ),
    (sql) =>
      Effect.promise(() => sql.end({ timeout: poolEndTimeoutSeconds })).pipe(
        Effect.andThen(Effect.logInfo("Database pool closed"))
      )
  ))
  const tracker = new ConnectionTracker()
  tracker.install(sql)
  // Drizzle patches the pool's serializers (jsonb parameters pass through as text); every query
  // in runlane binds JSON as text cast by the server, so it is encoded exactly once either way.
  const db = drizzle(sql, { schema })
  const use = <A>(operation: string, f: (sql: postgres.Sql) => PromiseLike<A>) =>
    Effect.tryPromise({ try: () => f(sql), catch: (cause) => DatabaseError.fromCause(operation, cause) })
  const terminateBackend = async (pid: number): Promise<boolean> => {
    const client = postgres(Redacted.value(options.url), {
      max: 1,
      onnotice: () => {},
      connect_timeout: terminateConnectTimeoutSeconds,
      connection: { application_name: `${applicationName}:terminate` }
    })
    try {
      const [row] = await client<Array<{ terminated: boolean }>>`select pg_terminate_backend(${pid}) as terminated`
      return row?.terminated === true
    } finally {
      await client.end({ timeout: 1 })
    }
  }
  const pin = (timeoutMs: number, first?: FirstQuery): PendingPin =>
    new PendingReservation(sql, tracker, timeoutMs, poolMax, first)
  const reserve = (timeoutMs: number) =>
    Effect.callback<PinnedConnection, PoolExhausted | DatabaseError>((resume) => {
      let abandoned = false
      const pending = pin(timeoutMs)
      pending.promise.then(
        (pinned) => (abandoned ? pinned.release() : resume(Effect.succeed(pinned))),
        (error: unknown) => {
          if (!abandoned) resume(Effect.fail(error as PoolExhausted | DatabaseError))
        }
      )
      return Effect.sync(() => {
        abandoned = true
        pending.abandon()
      })
    })
  return Database.of({ sql, db, poolMax, url: options.url, applicationName, use, reserve, pin, terminateBackend })
})
