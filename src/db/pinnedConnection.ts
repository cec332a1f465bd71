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
 * `debug` hook from a query carrying a unique token) and the pool's `onclose` hook marks it closed
 * synchronously, in the same tick postgres.js drops the socket. A pinned connection refuses queries
 * once closed, releases at most once, and never releases a closed connection (postgres.js has already
 * taken it back). Side effect of the `debug` hook: postgres.js then makes the query text and parameters
 * of its errors enumerable; runlane never puts them in a DatabaseError message.
 */
import { randomUUID } from "node:crypto"
import type postgres from "postgres"

const tokenPrefix = "runlane-pin:"
/**
 * Tokens are this process's random part plus a counter: unique per pin, and unguessable to anyone
 * who could put text into another query's last parameter. Cheaper than a UUID per pin.
 */
const processTokenSecret = randomUUID()
let tokenCounter = 0

/** Raised instead of touching a pinned connection that is known to be closed. */
export class PinnedConnectionClosed extends Error {
  // A connection-class code, so DatabaseError classifies it as retryable.
  readonly code = "CONNECTION_CLOSED"
  constructor(pid: number) {
    super(`the pinned connection (backend ${pid}) is closed`)
  }
}

/** A row of the identifying query: the backend pid, plus whatever the caller's first query selects. */
export type IdentifiedRow = { readonly pid: number } & Readonly<Record<string, unknown>>

/**
 * The first query on a pinned connection. It must bind `token` as its LAST parameter (the pool's
 * debug hook recognizes the connection by it; a trailing `where $n::text is not null` binds it without
 * selecting it back) and select `pg_backend_pid() as pid`, in exactly one row.
 */
export type FirstQuery = (sql: postgres.ReservedSql, token: string) => postgres.PendingQuery<Array<IdentifiedRow>>

const ignore = (): undefined => undefined

/**
 * A postgres.js query is already a Promise (a subclass whose `then` sends it); wrapping it in
 * Promise.resolve would add microtask hops. Callers attach a reaction at once, which sends it.
 */
const asPromise = <A>(value: PromiseLike<A>): Promise<A> =>
  value instanceof Promise ? (value as Promise<A>) : Promise.resolve(value)

// The token only has to travel as a parameter (the debug hook reads it there); it is not selected back.
const identifyOnly: FirstQuery = (sql, token) =>
  sql<Array<IdentifiedRow>>`select pg_backend_pid() as pid where ${token}::text is not null`

export class PinnedConnection {
  /** postgres.js connection id, known as soon as the identifying query is handed to the connection. */
  connectionId: number | undefined = undefined
  /** Server backend pid of the session. */
  pid = 0
  private isClosed = false
  private isReleased = false
  private readonly closeWaiters: Array<() => void> = []
  /**
   * The rows of the identifying query, which is sent the moment the connection is pinned, before
   * anything else can run (`pid` is known once it answers). It is the caller's own first query when one
   * was given (no extra statement), otherwise a bare `select pg_backend_pid()`.
   */
  readonly firstRows: Promise<ReadonlyArray<IdentifiedRow>>
  private readyPromise: Promise<void> | undefined = undefined

  constructor(
    private readonly reserved: postgres.ReservedSql,
    private readonly tracker: ConnectionTracker,
    first: FirstQuery = identifyOnly
  ) {
    this.firstRows = this.identify(first)
    // Observed by whoever awaits it; a pinned connection abandoned early must not surface it.
    this.firstRows.catch(ignore)
  }

  /** Settles when the identifying query has answered (made on first use: every promise reaction costs). */
  get ready(): Promise<void> {
    if (this.readyPromise === undefined) {
      this.readyPromise = this.firstRows.then(ignore)
      this.readyPromise.catch(ignore)
    }
    return this.readyPromise
  }

  /** true once postgres.js has seen the connection close; the session and its locks are gone. */
  get closed(): boolean {
    return this.isClosed
  }

  get released(): boolean {
    return this.isReleased
  }

  /** Resolves when the connection closes (never, if it is released healthy first). */
  whenClosed(): Promise<void> {
    return this.isClosed ? Promise.resolve() : new Promise((resolve) => this.closeWaiters.push(resolve))
  }

  /** Calls `listener` once when the connection closes (at once if it already has); no promise involved. */
  onClosed(listener: () => void): void {
    if (this.isClosed) listener()
    else this.closeWaiters.push(listener)
  }

  /** Called by the tracker, synchronously from postgres.js's close handler. */
  markClosed(): void {
    if (this.isClosed) return
    this.isClosed = true
    for (const wake of this.closeWaiters.splice(0)) wake()
  }

  /**
   * Runs one query on the pinned session. `f` must issue its query synchronously: the closed check and
   * the write then happen in the same tick, so a close can only arrive after the query is in flight,
   * where postgres.js rejects it instead of crashing.
   */
  query<A>(f: (sql: postgres.ReservedSql) => PromiseLike<A>): Promise<A> {
    if (this.isClosed || this.isReleased) return Promise.reject(new PinnedConnectionClosed(this.pid))
    return asPromise(f(this.reserved))
  }

  /** `query` for destroy, which runs after the connection is already marked released. */
  private reservedQuery<A>(f: (sql: postgres.ReservedSql) => PromiseLike<A>): Promise<A> {
    if (this.isClosed) return Promise.reject(new PinnedConnectionClosed(this.pid))
    return asPromise(f(this.reserved))
  }

  /** Returns a healthy connection to the pool. At most once; a closed connection is already back. */
  release(): void {
    if (this.isReleased) return
    this.isReleased = true
    this.tracker.forget(this)
    if (!this.isClosed) this.reserved.release()
  }

  /**
   * Ends the session so that whatever it holds is dropped, without ever returning it to the pool:
   * `pg_terminate_backend` through `terminate` (a connection outside the pool: when every pool
   * connection is pinned, a terminate queued on the pool would wait for itself), then waits (bounded)
   * for postgres.js to see the close, after which postgres.js reconnects that slot on demand.
   * Answers whether the close was seen.
   */
  async destroy(terminate: (pid: number) => Promise<unknown>, timeoutMs: number): Promise<boolean> {
    if (this.isReleased) return this.isClosed
    this.isReleased = true
    try {
      if (this.isClosed) return true
      const closed = this.whenClosed()
      // The pid may still be on its way, or the identifying query failed without closing the session.
      await withinMs(this.ready, timeoutMs).catch(() => undefined)
      if (this.pid === 0 && !this.isClosed) {
        await withinMs(this.reservedQuery((sql) => sql<Array<{ pid: number }>>`select pg_backend_pid() as pid`), timeoutMs)
          .then(([row]) => {
            this.pid = row?.pid ?? 0
          }, () => undefined)
      }
      if (this.pid !== 0 && !this.isClosed) await withinMs(terminate(this.pid), timeoutMs).catch(() => undefined)
      return await withinMs(closed.then(() => true), timeoutMs).catch(() => false)
    } finally {
      this.tracker.forget(this)
    }
  }

  /** The identifying query: learns the backend pid and, through the debug hook, the connection id. */
  private identify(first: FirstQuery): Promise<ReadonlyArray<IdentifiedRow>> {
    const token = `${tokenPrefix}${processTokenSecret}:${++tokenCounter}`
    this.tracker.expect(token, this)
    return this.query((sql) => {
      // postgres.js copies the pool's `debug` option onto each reserved handle, and with it set every
      // query captures a stack trace (`new Error()` in its constructor, tens of µs). Only the pool's
      // connection-level hook is needed here: this first query is built without stack capture, and
      // the capture is then turned off for the handle (query.handler is the handle's dispatcher).
      const stackTraceLimit = Error.stackTraceLimit
      Error.stackTraceLimit = 0
      let query: ReturnType<FirstQuery>
      try {
        query = first(sql, token)
      } finally {
        Error.stackTraceLimit = stackTraceLimit
      }
      const handler = (query as unknown as { handler?: { debug?: unknown } }).handler
      if (handler !== undefined) handler.debug = false
      return query
    })
      .then((rows) => {
        this.tracker.unexpect(token)
        this.pid = rows[0]!.pid
        return rows
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
    // `then` directly, not Promise.resolve(promise).then: a postgres.js query is a Promise subclass, and
    // adopting it would cost extra microtask hops on every lock and unlock.
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

/** Hooks installed on the pool: which connection each pinned handle runs on, and when one closes. */
export class ConnectionTracker {
  private readonly expected = new Map<string, PinnedConnection>()
  private readonly byConnectionId = new Map<number, PinnedConnection>()

  /** Pinned connections currently tracked (not yet released or destroyed). */
  get size(): number {
    return this.byConnectionId.size
  }

  /** Chains the hooks onto the pool's options; postgres.js reads both options at call time. */
  install(sql: postgres.Sql): void {
    const options = sql.options as { debug: unknown; onclose: unknown }
    const previousDebug = options.debug
    const previousOnClose = options.onclose
    options.debug = (connectionId: number, query: string, parameters: Array<unknown>, types: Array<unknown>) => {
      this.onQuery(connectionId, parameters)
      if (typeof previousDebug === "function") previousDebug(connectionId, query, parameters, types)
    }
    options.onclose = (connectionId: number) => {
      this.onClose(connectionId)
      if (typeof previousOnClose === "function") previousOnClose(connectionId)
    }
  }

  /**
   * Must be called in the same tick the reservation resolved: the identifying query is then written
   * before postgres.js can process a close of that connection.
   */
  pin(reserved: postgres.ReservedSql, first?: FirstQuery): PinnedConnection {
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

  private onQuery(connectionId: number, parameters: Array<unknown>): void {
    const token = parameters[parameters.length - 1]
    if (typeof token !== "string" || !token.startsWith(tokenPrefix)) return
    const pinned = this.expected.get(token)
    if (pinned === undefined) return
    pinned.connectionId = connectionId
    this.byConnectionId.set(connectionId, pinned)
  }

  private onClose(connectionId: number): void {
    const pinned = this.byConnectionId.get(connectionId)
    if (pinned === undefined) return
    this.byConnectionId.delete(connectionId)
    pinned.markClosed()
  }
}
