/**
 * Pool connections pinned to one holder (postgres.js `reserve()`), made safe to hold for a long time.
 *
 * postgres.js has three traps here, all reproduced on 3.4.9:
 * - a query written to a reserved connection after that connection closed is sent to a null socket
 *   from a setImmediate callback: an uncaught TypeError that takes the whole process down;
 * - `release()` of a connection that already closed puts the dead connection in the idle list;
 * - `release()` twice hands one connection to two holders (porsager/postgres#1199 is the same family).
 *
 * So every pinned connection is identified (its postgres.js connection id, learnt through the pool's
 * `debug` hook from a token that this file binds as the last parameter of the connection's first
 * query) and the pool's `onclose` hook marks it closed synchronously, in the tick postgres.js drops the
 * socket. A pinned connection refuses queries once closed, releases at most once, and never releases a
 * closed connection (postgres.js has already taken it back). The hooks live in postgresJsInternals.ts.
 */
import { randomUUID } from "node:crypto"
import type postgres from "postgres"
import { backendPidOf, buildWithoutStackCapture, installConnectionHooks } from "./postgresJsInternals.ts"

const tokenPrefix = "runlane-pin:"
/**
 * Tokens are this process's random part plus a counter: unique per pin, and unguessable to anyone
 * who could put text into another query's last parameter.
 */
const processTokenSecret = randomUUID()
let tokenCounter = 0

/** Raised instead of touching a pinned connection that is known to be closed or already given back. */
export class PinnedConnectionClosed extends Error {
  // A connection-class code, so DatabaseError classifies it as retryable.
  readonly code = "CONNECTION_CLOSED"
  constructor(pid: number) {
    super(`the pinned connection (backend ${pid}) is closed`)
  }
}

/**
 * Extra columns of the pinned connection's first query, so a caller's first statement costs no round
 * trip of its own: `columns` is constant SQL text whose placeholders are `$1..$n`, bound to
 * `parameters`. The query is `select pg_backend_pid() as pid, <columns> where $n+1::text is not null`,
 * the last parameter being the identifying token.
 */
export interface FirstColumns {
  readonly columns: string
  readonly parameters: ReadonlyArray<string | number>
}

export type FirstRow = { readonly pid: number } & Readonly<Record<string, unknown>>

export class PinnedConnection {
  /** postgres.js connection id, known as soon as the first query is handed to the connection. */
  connectionId: number | undefined = undefined
  /** Server backend pid of the session, once the first query has answered (see `knownPid`). */
  pid = 0
  /** The server's time when the first query ran (timestamptz as text); the session had started by then. */
  pinnedAt: string | undefined = undefined
  /** A terminate was delivered (or the session was found gone): never signal this pid again. */
  private terminateDelivered = false
  private isClosed = false
  private isGivenBack = false
  private readonly closeListeners: Array<() => void> = []
  private firstQuery: postgres.PendingQuery<Array<FirstRow>> | undefined = undefined
  /** Identifies this connection to the tracker, as the last parameter of a query. */
  private readonly token = `${tokenPrefix}${processTokenSecret}:${++tokenCounter}`
  /** The row of the first query, which is sent the moment the connection is pinned. */
  readonly firstRow: Promise<FirstRow>

  constructor(
    private readonly reserved: postgres.ReservedSql,
    private readonly tracker: ConnectionTracker,
    first: FirstColumns | undefined
  ) {
    this.firstRow = this.identify(first)
    // Observed by whoever awaits it; a pinned connection abandoned early must not surface it.
    this.firstRow.catch(() => undefined)
  }

  /** true once postgres.js has seen the connection close; the session and everything it held are gone. */
  get closed(): boolean {
    return this.isClosed
  }

  /**
   * The backend pid, known as soon as the first query was handed to the connection (from postgres.js's
   * own record of the session), even when its answer never comes; 0 before that.
   */
  get knownPid(): number {
    if (this.pid === 0 && this.firstQuery !== undefined) this.pid = backendPidOf(this.firstQuery) ?? 0
    return this.pid
  }

  /** Calls `listener` once when the connection closes (at once if it already has). */
  onClosed(listener: () => void): void {
    if (this.isClosed) listener()
    else this.closeListeners.push(listener)
  }

  /** Called by the tracker, synchronously from postgres.js's close handler. */
  markClosed(): void {
    if (this.isClosed) return
    this.isClosed = true
    this.tracker.forget(this)
    for (const listener of this.closeListeners.splice(0)) listener()
  }

  /**
   * Runs one query on the pinned session. `f` must issue its query synchronously: the closed check and
   * the write then happen in the same tick, so a close can only arrive after the query is in flight,
   * where postgres.js rejects it instead of crashing.
   */
  query<A>(f: (sql: postgres.ReservedSql) => PromiseLike<A>): Promise<A> {
    if (this.isClosed || this.isGivenBack) return Promise.reject(new PinnedConnectionClosed(this.pid))
    return Promise.resolve(f(this.reserved))
  }

  /** Returns a healthy connection to the pool. At most once; a closed connection is already back. */
  release(): void {
    if (this.isGivenBack) return
    this.isGivenBack = true
    this.tracker.forget(this)
    if (!this.isClosed) this.reserved.release()
  }

  /**
   * One attempt at ending the session without ever returning it to the pool: `pg_terminate_backend`
   * through `terminate` (a connection outside the pool: when every pool connection is pinned, a
   * terminate queued on the pool would wait for itself), then a bounded wait for postgres.js to see
   * the close, after which it reconnects that slot on demand. Answers whether the close was seen; may
   * be called again until it is (the pid is signalled at most once: after that it may be reused).
   */
  async terminate(terminate: (pid: number, startedBy: string | undefined) => Promise<boolean>, timeoutMs: number): Promise<boolean> {
    this.isGivenBack = true
    if (this.isClosed) return true
    const closed = new Promise<true>((resolve) => this.onClosed(() => resolve(true)))
    if (this.knownPid === 0) {
      // The first query never reached the connection: ask the session itself (bounded), with the token
      // again, so the close hook learns which connection this is.
      this.tracker.expect(this.token, this)
      await withinMs(
        this.reserved<Array<{ pid: number }>>`select pg_backend_pid() as pid where ${this.token}::text is not null`,
        timeoutMs
      ).then(([row]) => (this.pid = row?.pid ?? 0), () => undefined)
      this.tracker.unexpect(this.token)
    }
    if (this.knownPid !== 0 && !this.isClosed && !this.terminateDelivered) {
      this.terminateDelivered = await withinMs(terminate(this.knownPid, this.pinnedAt), timeoutMs).catch(() => false)
    }
    return await withinMs(closed, timeoutMs).catch(() => false)
  }

  /**
   * After a close postgres.js saw but runlane did not cause (a reset, a timeout on the client side), the
   * server session may live on, holding whatever it held. Terminates it unless it is gone (guarded by
   * `pinnedAt`, so a newer session with the same pid is never touched); answers whether the server
   * confirmed it gone or going. False when the server could not be asked.
   */
  async confirmEnded(terminate: (pid: number, startedBy: string | undefined) => Promise<boolean>, timeoutMs: number): Promise<boolean> {
    if (this.terminateDelivered) return true
    if (this.knownPid === 0 || this.pinnedAt === undefined) return true
    this.terminateDelivered = await withinMs(terminate(this.knownPid, this.pinnedAt), timeoutMs).catch(() => false)
    return this.terminateDelivered
  }

  /** The first query: learns the backend pid and, through the debug hook, the connection id. */
  private identify(first: FirstColumns | undefined): Promise<FirstRow> {
    const token = this.token
    const parameters = [...(first?.parameters ?? []), token]
    // statement_timestamp(): the server's clock when the session was pinned, to tell it from a later
    // session that reuses its pid (see `terminate`). As text: exact to the microsecond, and immune to
    // the pool's date parsers (Drizzle replaces them).
    const text = `select pg_backend_pid() as pid, statement_timestamp()::text as pinned_at${first === undefined ? "" : `, ${first.columns}`}` +
      ` where $${parameters.length}::text is not null`
    this.tracker.expect(token, this)
    return this.query((sql) => {
      this.firstQuery = buildWithoutStackCapture(() => sql.unsafe<Array<FirstRow>>(text, parameters, { prepare: true }))
      return this.firstQuery
    }).then((rows) => {
      this.tracker.unexpect(token)
      const row = rows[0]!
      this.pid = row.pid
      this.pinnedAt = typeof row["pinned_at"] === "string" ? row["pinned_at"] : undefined
      return row
    }, (error: unknown) => {
      this.tracker.unexpect(token)
      throw error
    })
  }
}

/** Rejects when `promise` has not settled within `ms`; the underlying work is not cancelled. */
export const withinMs = <A>(promise: PromiseLike<A>, ms: number): Promise<A> =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms)
    promise.then(
      (value) => {
        clearTimeout(timer)
        resolve(value)
      },
      (error: unknown) => {
        clearTimeout(timer)
        reject(error)
      }
    )
  })

/** The pool's hooks: which connection each pinned handle runs on, and when one closes. */
export class ConnectionTracker {
  private readonly expected = new Map<string, PinnedConnection>()
  private readonly byConnectionId = new Map<number, PinnedConnection>()

  constructor(sql: postgres.Sql) {
    installConnectionHooks(sql, {
      onQuery: (connectionId, parameters) => this.onQuery(connectionId, parameters),
      onClose: (connectionId) => this.onClose(connectionId)
    })
  }

  /** Pinned connections currently tracked (not yet given back, not yet seen closed). */
  get size(): number {
    return this.byConnectionId.size
  }

  /**
   * Must be called in the same tick the reservation resolved: the first query is then written before
   * postgres.js can process a close of that connection.
   */
  pin(reserved: postgres.ReservedSql, first: FirstColumns | undefined): PinnedConnection {
    return new PinnedConnection(reserved, this, first)
  }

  expect(token: string, pinned: PinnedConnection): void {
    this.expected.set(token, pinned)
  }

  unexpect(token: string): void {
    this.expected.delete(token)
  }

  forget(pinned: PinnedConnection): void {
    if (pinned.connectionId !== undefined && this.byConnectionId.get(pinned.connectionId) === pinned) {
      this.byConnectionId.delete(pinned.connectionId)
    }
  }

  private onQuery(connectionId: number, parameters: ReadonlyArray<unknown>): void {
    const token = parameters[parameters.length - 1]
    if (typeof token !== "string" || !token.startsWith(tokenPrefix)) return
    const pinned = this.expected.get(token)
    if (pinned === undefined) return
    pinned.connectionId = connectionId
    this.byConnectionId.set(connectionId, pinned)
  }

  private onClose(connectionId: number): void {
    this.byConnectionId.get(connectionId)?.markClosed()
  }
}
