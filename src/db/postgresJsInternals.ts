/**
 * Every postgres.js internal runlane relies on, in one file, checked against 3.4.9 by
 * test/db/postgresJsInternals.test.ts (which fails when an upgrade changes any of them).
 *
 * postgres.js does not say which pool connection a reserved handle runs on, nor when it closes; runlane
 * needs both to keep pinned connections safe (see pinnedConnection.ts). It learns them through:
 * - `options.debug(connectionId, query, parameters, types)`: called as each query is handed to a
 *   connection. Read from `sql.options` at call time, so it can be installed after the pool exists.
 * - `options.onclose(connectionId)`: called synchronously from the pool's close handler, in the tick
 *   postgres.js drops the socket. Also read at call time.
 * - `query.handler.debug`: each reserved handle copies the pool's `debug`; with it set, every query
 *   captures a stack trace in its constructor (tens of microseconds). Turning it off on the handle keeps
 *   the connection-level hook above and drops that cost.
 * Side effect of a `debug` hook: postgres.js makes the query text and parameters of its errors
 * enumerable; runlane never puts them in a DatabaseError message.
 */
import type postgres from "postgres"

/** The postgres.js version whose internals this file was written against (package.json pins it). */
export const testedPostgresJsVersion = "3.4.9"

export interface ConnectionHooks {
  /** A query with these parameters was handed to pool connection `connectionId`. */
  readonly onQuery: (connectionId: number, parameters: ReadonlyArray<unknown>) => void
  /** Pool connection `connectionId` closed (its server session is gone). */
  readonly onClose: (connectionId: number) => void
}

interface HookedOptions {
  debug: unknown
  onclose: unknown
}

/** Chains runlane's hooks onto the pool's options, keeping any the caller set. */
export const installConnectionHooks = (sql: postgres.Sql, hooks: ConnectionHooks): void => {
  const options = sql.options as unknown as HookedOptions
  const previousDebug = options.debug
  const previousOnClose = options.onclose
  options.debug = (connectionId: number, query: string, parameters: Array<unknown>, types: Array<unknown>) => {
    hooks.onQuery(connectionId, parameters)
    if (typeof previousDebug === "function") previousDebug(connectionId, query, parameters, types)
  }
  options.onclose = (connectionId: number) => {
    hooks.onClose(connectionId)
    if (typeof previousOnClose === "function") previousOnClose(connectionId)
  }
}

/**
 * Builds one query on a reserved handle without the stack capture a `debug` hook costs, then turns the
 * capture off for the rest of the handle's life (its later queries are built the same way).
 */
export const buildWithoutStackCapture = <Q>(build: () => Q): Q => {
  const stackTraceLimit = Error.stackTraceLimit
  Error.stackTraceLimit = 0
  let query: Q
  try {
    query = build()
  } finally {
    Error.stackTraceLimit = stackTraceLimit
  }
  const handler = (query as unknown as { handler?: { debug?: unknown } }).handler
  if (handler !== undefined) handler.debug = false
  return query
}

/** The `application_name` a pool was created with, or undefined when it sets none. */
export const applicationNameOf = (sql: postgres.Sql): string | undefined => {
  const name = (sql.options as { connection?: { application_name?: unknown } }).connection?.application_name
  return typeof name === "string" && name !== "" ? name : undefined
}

/**
 * The backend pid of the session a query was handed to: postgres.js stores the connection's
 * BackendKeyData on the query (`query.state`) when it executes it, a microtask after `then`. Known even
 * when the query never answers, so a hung session can still be terminated.
 */
export const backendPidOf = (query: PromiseLike<unknown>): number | undefined => {
  const pid = (query as { state?: { pid?: unknown } }).state?.pid
  return typeof pid === "number" && pid > 0 ? pid : undefined
}
