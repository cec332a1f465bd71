/**
 * A database failure answers 500 with a generic body; what failed goes to the log only, so a client
 * never sees SQL, table names or connection details.
 */
import { Effect, Predicate } from "effect"
import type { DatabaseError } from "../db/DatabaseError.ts"
import { InternalError } from "./RunlaneApi.ts"

export const internalError = new InternalError({ error: "Internal error" })

/** What failed, for the log only. */
export const logDatabaseFailure = (error: DatabaseError): Effect.Effect<void> =>
  Effect.logError("database failure answered 500", {
    operation: error.operation,
    sqlState: error.sqlState,
    retryable: error.retryable,
    message: error.message
  })

export const answerDatabaseFailure = <A, E, R>(
  self: Effect.Effect<A, E | DatabaseError, R>
): Effect.Effect<A, Exclude<E, DatabaseError> | InternalError, R> =>
  Effect.catchIf(
    self,
    (error): error is DatabaseError => Predicate.isTagged(error, "DatabaseError"),
    (error) => Effect.andThen(logDatabaseFailure(error), Effect.fail(internalError))
  ) as Effect.Effect<A, Exclude<E, DatabaseError> | InternalError, R>
