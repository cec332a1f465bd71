/**
 * The one error every database call fails with, and the one place that decides whether a retry can help.
 */
import { Predicate, Schema } from "effect"

/**
 * SQLSTATE classes and codes after which the same statement can succeed when tried again:
 * serialization failures and deadlocks (class 40), lock timeouts (55P03), cancelled statements (57014),
 * a server that is shutting down or starting (57P01-57P03), lost connections (class 08) and
 * exhausted server resources (class 53).
 */
const retryableSqlStates = new Set(["40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03"])
const retryableSqlStateClasses = new Set(["08", "53"])

/** Errors raised by postgres.js or Node's socket layer before any SQLSTATE exists; all are transient. */
const retryableClientCodes = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT"
])

const sqlStatePattern = /^[0-9A-Z]{5}$/

export class DatabaseError extends Schema.TaggedError<DatabaseError>()("DatabaseError", {
  /** What runlane was doing, e.g. "RunsQueue.send". */
  operation: Schema.String,
  message: Schema.String,
  /** The PostgreSQL SQLSTATE, when the server answered with one. */
  sqlState: Schema.optional(Schema.String),
  /** True when the same call may succeed if tried again. */
  retryable: Schema.Boolean,
  cause: Schema.Defect()
}) {
  /** Wraps anything a database call threw (drizzle wraps driver errors in `cause`, so the chain is walked). */
  static fromCause(operation: string, cause: unknown): DatabaseError {
    const code = findErrorCode(cause)
    const sqlState = code !== undefined && sqlStatePattern.test(code) ? code : undefined
    return new DatabaseError({
      operation,
      message: describe(cause),
      ...(sqlState === undefined ? {} : { sqlState }),
      retryable: isRetryableCode(code),
      cause
    })
  }
}

export const isRetryableCode = (code: string | undefined): boolean => {
  if (code === undefined) return false
  if (retryableClientCodes.has(code)) return true
  return sqlStatePattern.test(code) &&
    (retryableSqlStates.has(code) || retryableSqlStateClasses.has(code.slice(0, 2)))
}

const findErrorCode = (cause: unknown): string | undefined => {
  let current: unknown = cause
  for (let depth = 0; depth < 5 && Predicate.isObject(current); depth++) {
    if ("code" in current && Predicate.isString(current.code)) return current.code
    current = "cause" in current ? current.cause : undefined
  }
  return undefined
}

const describe = (cause: unknown): string => {
  let current: unknown = cause
  // Prefer the innermost driver message over drizzle's "Failed query: <sql>" wrapper.
  for (let depth = 0; depth < 5 && Predicate.isObject(current) && "cause" in current && current.cause; depth++) {
    current = current.cause
  }
  return current instanceof Error ? current.message : String(current)
}
