/**
 * Refuses transaction poolers. Session advisory locks (conversation locks, the migration lock) need one
 * server session for the whole life of a pinned connection; behind PgBouncer in transaction mode each
 * transaction may run on another server connection, and a lock would strand on a session nobody
 * controls (authentik#23876).
 *
 * Asking twice whether a session setting survived is not enough: PgBouncer hands an idle client the
 * most recently freed server connection, so consecutive statements of one client usually land on the
 * same server session and such a probe passes. This one keeps the server connection the pinned client
 * just used busy: another client opens a transaction (a LIFO pooler gives it exactly that server
 * connection) and holds it while the pinned client asks for its backend pid again. On a direct
 * connection, or with session pooling, the pid is unchanged; behind a transaction pooler it differs, or
 * the question waits for a server connection until the bound runs out.
 */
import { Effect, Schema } from "effect"
import type postgres from "postgres"
import { DatabaseError } from "./DatabaseError.ts"
import { withinMs } from "./pinnedConnection.ts"

/** A connection that must keep one server session: a pinned pool connection, or a client of its own. */
export interface SessionUnderProbe {
  readonly pid: number
  readonly query: <A>(f: (sql: postgres.Sql) => PromiseLike<A>) => Promise<A>
}

/** The database connection does not keep one server session across transactions. */
export class SessionPoolingRequired extends Schema.TaggedError<SessionPoolingRequired>()("SessionPoolingRequired", {
  /** Who needs session pooling, e.g. "conversation locks". */
  needs: Schema.String,
  message: Schema.String
}) {}

export type SessionProbe =
  | { readonly _tag: "SameSession" }
  | { readonly _tag: "OtherSession"; readonly before: number; readonly after: number }
  | { readonly _tag: "Unanswered" }

/**
 * The probe itself: `session` is a pinned connection whose pid is known, `other` a pool that can open a
 * transaction on another client connection. Promise-based so the migrator's own client can use it too.
 */
export const probeSession = async (
  session: SessionUnderProbe,
  other: postgres.Sql,
  timeoutMs: number
): Promise<SessionProbe> => {
  const before = session.pid
  let unanswered = false
  const after = await other.begin(async (transaction) => {
    await transaction`select pg_backend_pid()`
    try {
      const [row] = await withinMs(session.query((sql) => sql<Array<{ pid: number }>>`select pg_backend_pid() as pid`), timeoutMs)
      return row!.pid
    } catch (error) {
      if (!(error instanceof Error && error.message.startsWith("timed out"))) throw error
      unanswered = true
      return 0
    }
  })
  if (unanswered) return { _tag: "Unanswered" }
  return after === before ? { _tag: "SameSession" } : { _tag: "OtherSession", before, after }
}

/** The probe as an Effect, with the refusal that names the cause and the fix. */
export const assertSessionPooling = Effect.fnUntraced(function*(
  needs: string,
  session: SessionUnderProbe,
  other: postgres.Sql,
  timeoutMs: number
) {
  // Bounded as a whole: the transaction needs a second connection, which may be slow to come.
  const probe = yield* Effect.tryPromise({
    try: () => withinMs(probeSession(session, other, timeoutMs), 2 * timeoutMs),
    catch: (cause) => DatabaseError.fromCause("assertSessionPooling", cause)
  })
  if (probe._tag === "SameSession") return
  const seen = probe._tag === "OtherSession"
    ? `two statements of one pinned connection ran on server sessions ${probe.before} and ${probe.after}`
    : `a pinned connection got no answer within ${timeoutMs} ms while another client held a transaction open`
  return yield* new SessionPoolingRequired({
    needs,
    message: `${needs} need one server session per connection, but ${seen}: this looks like a transaction ` +
      "pooler (PgBouncer with pool_mode = transaction or statement). Connect directly to PostgreSQL, or " +
      "through a pooler in session mode (pool_mode = session)"
  })
})
