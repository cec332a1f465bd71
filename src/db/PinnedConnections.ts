/**
 * PinnedConnections: pins pool connections to one holder with a bounded wait, and ends sessions that
 * cannot be trusted back in the pool. Internal to runlane (db/ and locks/): not exported from the
 * package; library users pin through `Database.reserve`, which is scoped.
 *
 * postgres.js `reserve()` waits forever when the pool is full and cannot be cancelled
 * (porsager/postgres#1195), so a pin that times out or is abandoned stays subscribed: a connection
 * arriving after that goes straight back, having run nothing.
 */
import { Context, Redacted } from "effect"
import postgres from "postgres"
import { DatabaseError } from "./DatabaseError.ts"
import { type ConnectionTracker, type FirstColumns, type PinnedConnection } from "./pinnedConnection.ts"
import { PoolExhausted } from "./PoolExhausted.ts"

/** What a pin reports, exactly once, synchronously from the callback the reservation arrives in. */
export interface PinCallbacks {
  /** The connection is pinned and its first query is on its way. */
  readonly onPinned: (pinned: PinnedConnection) => void
  readonly onFailed: (error: PoolExhausted | DatabaseError) => void
}

export interface PendingPin {
  /**
   * Stops waiting: no callback will run, and a connection that arrives later goes straight back.
   * Answers false when a callback has already run (the pin's outcome is then the caller's to handle).
   */
  abandon(): boolean
}

/** Seconds the one-off connection of `terminateBackend` may take to connect. */
const terminateConnectTimeoutSeconds = 5

export class PinnedConnections extends Context.Service<PinnedConnections, {
  /**
   * Pins one pool connection, waiting at most `timeoutMs`; its first query selects the backend pid
   * and `first`'s columns. Callbacks run synchronously where the reservation arrives, so there is no
   * moment when a connection is pinned but its owner does not know it.
   */
  readonly pin: (timeoutMs: number, first: FirstColumns | undefined, callbacks: PinCallbacks) => PendingPin
  /**
   * `pg_terminate_backend(pid)` on a one-off connection outside the pool, so it works when every pool
   * connection is pinned. With `startedBy` (the server time the session was pinned, as timestamptz text), only a backend
   * that had started by then is signalled, so a pid reused by a newer session is never touched.
   * Answers true when the backend was signalled or is gone; rejects when the connection cannot be made.
   */
  readonly terminateBackend: (pid: number, startedBy: string | undefined) => Promise<boolean>
}>()("runlane/PinnedConnections") {}

class PendingReservation implements PendingPin {
  private settled = false
  private readonly timer: ReturnType<typeof setTimeout>

  constructor(
    sql: postgres.Sql,
    tracker: ConnectionTracker,
    timeoutMs: number,
    poolMax: number,
    first: FirstColumns | undefined,
    callbacks: PinCallbacks
  ) {
    this.timer = setTimeout(() => {
      if (this.settle()) callbacks.onFailed(new PoolExhausted({ timeoutMs, poolMax }))
    }, timeoutMs)
    sql.reserve().then(
      (reserved) => {
        // Nobody waits for it any more; it ran nothing, so it goes straight back.
        if (!this.settle()) return releaseQuietly(reserved)
        let pinned: PinnedConnection
        try {
          pinned = tracker.pin(reserved, first)
        } catch (cause) {
          // The first query could not even be built, so nothing was sent on the connection.
          releaseQuietly(reserved)
          return callbacks.onFailed(DatabaseError.fromCause("Database.reserve", cause))
        }
        callbacks.onPinned(pinned)
      },
      (cause: unknown) => {
        if (this.settle()) callbacks.onFailed(DatabaseError.fromCause("Database.reserve", cause))
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

/** For connections nobody waits for: postgres.js's release is synchronous bookkeeping already done when it throws. */
const releaseQuietly = (connection: { release(): void }) => {
  try {
    connection.release()
  } catch {
    // Nobody to report it to; see above.
  }
}

export const makePinnedConnections = (options: {
  readonly sql: postgres.Sql
  readonly tracker: ConnectionTracker
  readonly poolMax: number
  readonly url: Redacted.Redacted<string>
  readonly applicationName: string | undefined
}): PinnedConnections["Service"] => ({
  pin: (timeoutMs, first, callbacks) =>
    new PendingReservation(options.sql, options.tracker, timeoutMs, options.poolMax, first, callbacks),
  terminateBackend: async (pid, startedBy) => {
    const client = postgres(Redacted.value(options.url), {
      max: 1,
      onnotice: () => {},
      connect_timeout: terminateConnectTimeoutSeconds,
      ...(options.applicationName === undefined
        ? {}
        : { connection: { application_name: `${options.applicationName}:terminate` } })
    })
    try {
      if (startedBy === undefined) {
        const [row] = await client<Array<{ terminated: boolean }>>`select pg_terminate_backend(${pid}) as terminated`
        return row?.terminated === true
      }
      const [row] = await client<Array<{ terminated: boolean }>>`
        select pg_terminate_backend(pid) as terminated from pg_stat_activity where pid = ${pid} and backend_start <= ${startedBy}::timestamptz`
      // No row: that session is gone (a backend with its pid now, if any, started after it was pinned).
      return row === undefined || row.terminated
    } finally {
      await client.end({ timeout: 1 })
    }
  }
})
