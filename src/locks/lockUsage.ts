/** What `localUsage` and `usage` report: this process's counts, and pg_locks for every process. */
import { Effect } from "effect"
import type { Database } from "../db/Database.ts"
import type { LockCounter } from "./lockCounter.ts"
import type { LockSession } from "./lockSession.ts"

export interface LocalLockUsage {
  readonly held: number
  readonly inFlight: number
  /** Sessions that may still hold a lock and whose end is not confirmed; their terminate is retried. */
  readonly stranded: number
  readonly cap: number
  /** held + inFlight + stranded >= 80% of the cap (never for a cap of 0). */
  readonly nearCap: boolean
  /** Age of the oldest held lock in milliseconds, null when none is held. */
  readonly oldestHoldMs: number | null
  readonly acquired: number
  readonly busy: number
  readonly capReached: number
  readonly lost: number
}

export interface LockUsage extends LocalLockUsage {
  /** Locks of the namespace that this process's sessions hold, according to pg_locks. */
  readonly heldInDatabaseByThisProcess: number
  /** Locks of the namespace held by every process sharing the database. */
  readonly heldInDatabase: number
}

export const lockUsage = (options: {
  readonly database: Database["Service"]
  readonly counter: LockCounter
  readonly counters: { readonly acquired: number; readonly busy: number; readonly capReached: number; readonly lost: number }
  readonly live: ReadonlySet<LockSession>
  readonly namespace: number
}) => {
  const { database, counter, counters, live } = options
  // pg_locks shows the first int4 as an oid, i.e. unsigned.
  const namespaceOid = String(options.namespace >>> 0)

  const local = Effect.sync((): LocalLockUsage => {
    let oldest: number | null = null
    for (const session of live) {
      if (session.isHeld && (oldest === null || session.acquiredAt < oldest)) oldest = session.acquiredAt
    }
    return {
      held: counter.held,
      inFlight: counter.inFlight,
      stranded: counter.stranded,
      cap: counter.cap,
      nearCap: counter.nearCap,
      oldestHoldMs: oldest === null ? null : Date.now() - oldest,
      ...counters
    }
  })

  // "This process" is the sessions it pinned, by backend pid: an application_name would also match
  // other processes whose pools set none, or the same one.
  const reconciled = Effect.gen(function*() {
    const usage = yield* local
    const pids = [...live].map((session) => session.backendPid).filter((pid) => pid !== 0)
    const [row] = yield* database.use("ConversationLocks.usage", (sql) =>
      sql<Array<{ ours: number; total: number }>>`
        select count(*) filter (where pid = any(${pids}::int[]))::int as ours, count(*)::int as total
          from pg_locks
         where locktype = 'advisory' and classid = ${namespaceOid}::oid and objsubid = 2 and granted`)
    return { ...usage, heldInDatabaseByThisProcess: row?.ours ?? 0, heldInDatabase: row?.total ?? 0 }
  })

  return { local, reconciled }
}
