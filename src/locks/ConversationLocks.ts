/**
 * ConversationLocks: at most one holder per (organization, agent, conversation) across every process
 * sharing the database, through a session advisory lock held on a pinned pool connection.
 *
 * `acquire` follows one order, and every step of it is load-bearing:
 * 1. cap check against this process's count (held + in flight): over the cap fails LockCapReached
 *    without touching the count;
 * 2. count up before anything asynchronous, so concurrent acquirers see each other;
 * 3. pin a pool connection within the reserve timeout (PoolExhausted otherwise);
 * 4. pg_try_advisory_lock on it: false is ConversationBusy;
 * 5. finalizers, run on success, failure and interruption alike, in this order: stop the watchdog;
 *    unlock (bounded retries, skipped when the session is gone); return the connection only after a
 *    successful unlock, otherwise end the session (a session that may still hold the lock never goes
 *    back to the pool); count down, exactly once, whatever failed before.
 * While the lock is held a watchdog notices a dead session at once when postgres.js sees the
 * connection close, and within one keepalive interval otherwise; the handle exposes the loss.
 */
import { randomUUID } from "node:crypto"
import { Config, Context, Deferred, Effect, Layer, Option, Schema, type Scope } from "effect"
import { Database, type PoolExhausted } from "../db/Database.ts"
import { DatabaseError } from "../db/DatabaseError.ts"
import { type FirstQuery, type IdentifiedRow, type PinnedConnection, withinMs } from "../db/pinnedConnection.ts"
import { capVariable, nearCapThreshold, resolveLockCap } from "./lockCap.ts"
import { type ConversationKey, conversationLockHash, defaultLockNamespace, isLockNamespace } from "./lockKey.ts"

export class ConversationBusy extends Schema.TaggedError<ConversationBusy>()("ConversationBusy", {
  organizationId: Schema.String,
  agentId: Schema.String,
  conversationId: Schema.String
}) {}

/** This process already pins as many connections as its cap allows. The count was not changed. */
export class LockCapReached extends Schema.TaggedError<LockCapReached>()("LockCapReached", {
  count: Schema.Number,
  cap: Schema.Number
}) {}

/** The session holding the lock died while it was held (backend terminated, connection dropped). */
export class LockLost extends Schema.TaggedError<LockLost>()("LockLost", {
  organizationId: Schema.String,
  agentId: Schema.String,
  conversationId: Schema.String,
  backendPid: Schema.Number,
  reason: Schema.String
}) {}

/** A setting that would make locks unsafe; the service refuses to start. */
export class LockConfigError extends Schema.TaggedError<LockConfigError>()("LockConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}

/** The database connection does not keep one server session across transactions. */
export class SessionPoolingRequired extends Schema.TaggedError<SessionPoolingRequired>()("SessionPoolingRequired", {
  message: Schema.String
}) {}

export type AcquireError = ConversationBusy | LockCapReached | PoolExhausted | DatabaseError

export interface ConversationLock {
  readonly key: ConversationKey
  /** The two int4 keys of pg_advisory_lock. */
  readonly advisoryKey: readonly [number, number]
  readonly backendPid: number
  /** Epoch milliseconds. */
  readonly acquiredAt: number
  /** true once the session holding the lock is known to be gone. */
  readonly isLost: Effect.Effect<boolean>
  /** Completes with the loss when the session dies; never completes while the lock is held. */
  readonly awaitLost: Effect.Effect<LockLost>
}

export interface LocalLockUsage {
  readonly held: number
  readonly inFlight: number
  readonly cap: number
  /** count >= 80% of the cap (never for a cap of 0). */
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

export interface ConversationLocksOptions {
  /** Most connections this process may pin at once; 0 refuses every acquire. */
  readonly cap: number
  /** First int4 of every conversation lock. Defaults to "rlck" (0x726c636b). */
  readonly namespace?: number
  /** Longest wait for a pool connection. Defaults to 5,000 ms. */
  readonly reserveTimeoutMs?: number
  /** Watchdog interval while a lock is held. Defaults to 5,000 ms. */
  readonly keepaliveMs?: number
}

export const defaults = { reserveTimeoutMs: 5_000, keepaliveMs: 5_000 } as const

/** Unlock attempts and the waits between them. */
const unlockBackoffMs = [100, 200] as const
/** Bound on each query a finalizer runs, so shutdown cannot hang on a stalled connection. */
const finalizerQueryTimeoutMs = 2_000

export class ConversationLocks extends Context.Service<ConversationLocks, {
  /** Holds the conversation's lock for the life of the caller's scope. */
  readonly acquire: (key: ConversationKey) => Effect.Effect<ConversationLock, AcquireError, Scope.Scope>
  /**
   * Runs `f` while holding the lock. If the session dies meanwhile, `f` is interrupted and the
   * result is a LockLost failure.
   */
  readonly withLock: <A, E, R>(
    key: ConversationKey,
    f: (lock: ConversationLock) => Effect.Effect<A, E, R>
  ) => Effect.Effect<A, E | AcquireError | LockLost, Exclude<R, Scope.Scope>>
  /** In-process counts and counters; no database access. */
  readonly localUsage: Effect.Effect<LocalLockUsage>
  /** `localUsage` reconciled with pg_locks. */
  readonly usage: Effect.Effect<LockUsage, DatabaseError>
}>()("runlane/ConversationLocks") {
  static readonly layerWith = (options: ConversationLocksOptions) =>
    Layer.effect(
      ConversationLocks,
      Effect.gen(function*() {
        return yield* make(yield* Database, options)
      })
    )

  /**
   * Configured from the environment: RUNLANE_MAX_RESERVED_LOCKS (default max(1, DB_POOL_MAX - 5)),
   * RUNLANE_LOCK_NAMESPACE, RUNLANE_LOCK_RESERVE_TIMEOUT_MS, RUNLANE_LOCK_KEEPALIVE_MS. Refuses to
   * start on an unsafe cap or behind a transaction pooler.
   */
  static readonly layer = Layer.effect(
    ConversationLocks,
    Effect.gen(function*() {
      const database = yield* Database
      const override = yield* Config.option(Config.String(capVariable))
      const resolution = resolveLockCap(database.poolMax, Option.getOrUndefined(override))
      if (resolution._tag === "Invalid") {
        return yield* new LockConfigError({ variable: capVariable, message: resolution.message })
      }
      const namespace = yield* Config.Int("RUNLANE_LOCK_NAMESPACE").pipe(Config.withDefault(defaultLockNamespace))
      if (!isLockNamespace(namespace)) {
        return yield* new LockConfigError({
          variable: "RUNLANE_LOCK_NAMESPACE",
          message: `RUNLANE_LOCK_NAMESPACE=${namespace} is outside the int4 range`
        })
      }
      const reserveTimeoutMs = yield* positiveMilliseconds("RUNLANE_LOCK_RESERVE_TIMEOUT_MS", defaults.reserveTimeoutMs)
      const keepaliveMs = yield* positiveMilliseconds("RUNLANE_LOCK_KEEPALIVE_MS", defaults.keepaliveMs)
      if (resolution.cap > 0) yield* assertSessionPooling(database, reserveTimeoutMs)
      return yield* make(database, { cap: resolution.cap, namespace, reserveTimeoutMs, keepaliveMs })
    })
  )
}

const positiveMilliseconds = Effect.fnUntraced(function*(variable: string, fallback: number) {
  const value = yield* Config.Int(variable).pipe(Config.withDefault(fallback))
  if (value > 0) return value
  return yield* new LockConfigError({ variable, message: `${variable}=${value} must be a positive number of milliseconds` })
})

/**
 * Session advisory locks need one server session for the whole life of a pinned connection. Behind
 * PgBouncer in transaction mode each transaction may run on another server connection, and a lock
 * would strand on a session nobody controls (authentik#23876). A session-level setting written in one
 * transaction must still be there in the next ones.
 */
export const assertSessionPooling = Effect.fnUntraced(function*(database: Database["Service"], reserveTimeoutMs: number) {
  const pinned = yield* database.reserve(reserveTimeoutMs).pipe(
    Effect.catchTag("PoolExhausted", (error) =>
      Effect.fail(DatabaseError.fromCause("ConversationLocks.assertSessionPooling", error)))
  )
  const probe = `probe-${randomUUID()}`
  const sameSession = yield* Effect.tryPromise({
    try: async () => {
      await pinned.ready
      await pinned.query((sql) => sql`select set_config('runlane.session_probe', ${probe}, false)`)
      for (let transaction = 0; transaction < 3; transaction++) {
        const [row] = await pinned.query((sql) =>
          sql<Array<{ value: string | null }>>`select current_setting('runlane.session_probe', true) as value`)
        if (row?.value !== probe) return false
      }
      await pinned.query((sql) => sql`select set_config('runlane.session_probe', '', false)`)
      return true
    },
    catch: (cause) => DatabaseError.fromCause("ConversationLocks.assertSessionPooling", cause)
  }).pipe(
    // A probe that answered leaves a healthy session; one that failed midway is ended.
    Effect.tap(() => Effect.sync(() => pinned.release())),
    Effect.tapError(() => Effect.promise(() => pinned.destroy(database.terminateBackend, reserveTimeoutMs)))
  )
  if (!sameSession) {
    return yield* new SessionPoolingRequired({
      message: "the database connection does not keep one server session across transactions " +
        "(a transaction pooler such as PgBouncer in transaction mode?); conversation locks need a direct " +
        "connection or session pooling"
    })
  }
})

interface Slot {
  counted: boolean
  state: "inFlight" | "held"
  acquiredAt: number
}

/**
 * Keepalive of one held lock: a `select 1` every `keepaliveMs`; a failure, or the connection's close
 * (reported through `lose`), ends it and calls `onLost` once. A class, so holding a lock creates no
 * closures beyond the timer's.
 */
class Watchdog {
  private stopped = false
  private timer: ReturnType<typeof setTimeout> | undefined = undefined

  constructor(
    private readonly pinned: PinnedConnection,
    private readonly keepaliveMs: number,
    private readonly onLost: (reason: string) => void
  ) {
    this.schedule()
  }

  stop(): void {
    this.stopped = true
    clearTimeout(this.timer)
  }

  lose(reason: string): void {
    if (this.stopped) return
    this.stop()
    this.onLost(reason)
  }

  private schedule(): void {
    this.timer = setTimeout(() => {
      withinMs(this.pinned.query((sql) => sql`select 1`), this.keepaliveMs).then(
        () => {
          if (!this.stopped) this.schedule()
        },
        () => this.lose(this.pinned.closed ? "the connection closed" : "keepalive failed")
      )
    }, this.keepaliveMs)
    // A held lock must not keep the process alive on its own.
    this.timer.unref()
  }
}

/** One pinned connection and what is known of the lock on it. */
interface LockSession {
  readonly pinned: PinnedConnection
  readonly hash: number
  /** "unknown": the lock query was sent but its answer never arrived. */
  locked: "no" | "yes" | "unknown"
  lost: boolean
  /** Memoized: ending a session twice must not release its connection twice. */
  ending: Promise<SessionEnd> | undefined
}

/** One acquire's steps 3 and 4 in flight. */
interface Attempt {
  interrupted: boolean
  pinned: boolean
  /** Everything this attempt took is settled. */
  done: boolean
  /** Set only when an interruption has to wait for `done` (rare, so no promise per attempt). */
  wakeInterrupter: (() => void) | undefined
}

type UnlockOutcome = "not needed" | "unlocked" | "session gone" | "not held" | { readonly failed: unknown }
type ConnectionOutcome = "released" | "destroyed" | "destroy unconfirmed" | { readonly releaseFailed: unknown }

interface SessionEnd {
  readonly unlock: UnlockOutcome
  readonly connection: ConnectionOutcome
}

/**
 * The lock's life is kept in plain promises, inside as few Effect boundaries as possible: each
 * asynchronous Effect step is a scheduler hop, and a lock cycle made of a dozen of them measured
 * three times slower than the same queries written by hand (npm run bench).
 */
const make = Effect.fnUntraced(function*(database: Database["Service"], options: ConversationLocksOptions) {
  const cap = options.cap
  const namespace = options.namespace ?? defaultLockNamespace
  const reserveTimeoutMs = options.reserveTimeoutMs ?? defaults.reserveTimeoutMs
  const keepaliveMs = options.keepaliveMs ?? defaults.keepaliveMs
  const threshold = nearCapThreshold(cap)
  // pg_locks shows the first int4 as an oid, i.e. unsigned.
  const namespaceOid = String(namespace >>> 0)
  // For logging from promise callbacks (the watchdog, abandoned acquires) through the host's logger.
  const services = yield* Effect.context<never>()
  const runLog = Effect.runForkWith(services)

  let count = 0
  let inFlight = 0
  let warnedNearCap = false
  const heldSlots = new Set<Slot>()
  const pinnedInUse = new Set<PinnedConnection>()
  const counters = { acquired: 0, busy: 0, capReached: 0, lost: 0 }
  // Holders' scopes normally close before this layer; a lock still counted here outlived its service.
  yield* Effect.addFinalizer(() =>
    Effect.suspend(() =>
      count === 0
        ? Effect.logInfo("Conversation locks closed: none held")
        : Effect.logWarning(`Conversation locks closed with ${count} still held or in flight`)
    ).pipe(Effect.annotateLogs({ module: "runlane/ConversationLocks" }))
  )

  const takeSlot = Effect.suspend(() => {
    if (count >= cap) {
      counters.capReached++
      return Effect.fail(new LockCapReached({ count, cap }))
    }
    count++
    inFlight++
    const slot: Slot = { counted: true, state: "inFlight", acquiredAt: 0 }
    const warn = !warnedNearCap && count >= threshold
    if (warn) warnedNearCap = true
    return warn
      ? Effect.logWarning("Conversation locks near cap").pipe(
        Effect.annotateLogs({ module: "runlane/ConversationLocks", count, cap, threshold }),
        Effect.as(slot)
      )
      : Effect.succeed(slot)
  })

  const countDownSync = (slot: Slot) => {
    if (!slot.counted) return
    slot.counted = false
    count--
    if (slot.state === "inFlight") inFlight--
    else heldSlots.delete(slot)
    if (warnedNearCap && count < threshold) warnedNearCap = false
  }

  /** Step 4 as the pinned connection's first (identifying) query, so the lock costs one statement. */
  const tryLock = (hash: number): FirstQuery => (sql, token) =>
    sql<Array<IdentifiedRow>>`
      select pg_backend_pid() as pid, pg_try_advisory_lock(${namespace}::int4, ${hash}::int4) as locked
       where ${token}::text is not null`

  const lockAnswer = (pinned: PinnedConnection): Promise<boolean> =>
    withinMs(pinned.firstRows.then((rows) => rows[0]?.["locked"] === true), reserveTimeoutMs)

  const unlockOnce = (session: LockSession): Promise<UnlockOutcome> =>
    withinMs(
      session.pinned.query((sql) =>
        sql<Array<{ unlocked: boolean }>>`select pg_advisory_unlock(${namespace}::int4, ${session.hash}::int4) as unlocked`),
      finalizerQueryTimeoutMs
    ).then(([row]) => row?.unlocked === true ? "unlocked" : "not held")

  /** After a failed first attempt: more attempts with backoff, unless the session is gone meanwhile. */
  const retryUnlock = async (session: LockSession, firstError: unknown): Promise<UnlockOutcome> => {
    let lastError = firstError
    for (const backoffMs of unlockBackoffMs) {
      await new Promise((resolve) => setTimeout(resolve, backoffMs))
      if (session.lost || session.pinned.closed) return "session gone"
      try {
        return await unlockOnce(session)
      } catch (error) {
        lastError = error
      }
    }
    return { failed: lastError }
  }

  /** Returns the connection only if the session is known to hold nothing, otherwise ends the session. */
  const settleConnection = (session: LockSession, unlock: UnlockOutcome): SessionEnd | Promise<SessionEnd> => {
    pinnedInUse.delete(session.pinned)
    const holdsNothing = session.pinned.closed || session.locked === "no" || unlock === "unlocked"
    if (holdsNothing) {
      try {
        session.pinned.release()
        return { unlock, connection: "released" }
      } catch (releaseFailed) {
        return { unlock, connection: { releaseFailed } }
      }
    }
    return session.pinned.destroy(database.terminateBackend, finalizerQueryTimeoutMs).then((closed) => ({
      unlock,
      connection: closed ? "destroyed" : "destroy unconfirmed"
    }))
  }

  /**
   * Step 5: unlock (unless the session is gone), then return the connection only if the session is
   * known to hold nothing, otherwise end the session. Never rejects; the outcome says what happened.
   */
  const endSession = (session: LockSession): Promise<SessionEnd> => {
    if (session.ending !== undefined) return session.ending
    const needsUnlock = session.locked === "yes" && !session.lost && !session.pinned.closed
    session.ending = needsUnlock
      ? unlockOnce(session).then(
        (unlock) => settleConnection(session, unlock),
        (firstError: unknown) => retryUnlock(session, firstError).then((unlock) => settleConnection(session, unlock))
      )
      : Promise.resolve(settleConnection(session, session.locked === "yes" ? "session gone" : "not needed"))
    return session.ending
  }

  const hasProblems = (end: SessionEnd): boolean =>
    end.unlock === "not held" || typeof end.unlock === "object" ||
    end.connection === "destroy unconfirmed" || typeof end.connection === "object"

  const reportEnd = (end: SessionEnd, key: ConversationKey, backendPid: number) => {
    const problems: Array<string> = []
    if (end.unlock === "not held") problems.push("the lock was not held at unlock; the session was ended")
    if (typeof end.unlock === "object") problems.push("unlock failed after retries; the session was ended")
    if (end.connection === "destroy unconfirmed") problems.push("the session did not close after it was terminated")
    if (typeof end.connection === "object") problems.push("returning the connection to the pool threw")
    if (problems.length === 0) return Effect.void
    const cause = typeof end.unlock === "object"
      ? end.unlock.failed
      : typeof end.connection === "object"
      ? end.connection.releaseFailed
      : undefined
    return Effect.logError("Conversation lock release had problems", problems.join("; "), ...(cause === undefined ? [] : [cause])).pipe(
      Effect.annotateLogs({ module: "runlane/ConversationLocks", ...key, backendPid })
    )
  }

  /**
   * Steps 3 and 4 in one asynchronous boundary. Resumes with the session (locked or not) or fails;
   * when interrupted, it ends whatever it already pinned itself, and the interruption completes only
   * once that is done, so the count (a later finalizer) still comes down last.
   */
  const finishAttempt = (attempt: Attempt) => {
    attempt.done = true
    attempt.wakeInterrupter?.()
  }

  /** Interrupted after pinning: learn whether the lock was taken (bounded), then end accordingly. */
  const abandonAttempt = (attempt: Attempt, session: LockSession, key: ConversationKey) =>
    lockAnswer(session.pinned)
      .then((locked) => {
        session.locked = locked ? "yes" : "no"
      }, () => undefined)
      .then(() => endSession(session))
      .then((end) => {
        runLog(reportEnd(end, key, session.pinned.pid))
        finishAttempt(attempt)
      })

  // The hot path below creates no named closures: each one costs a name definition per call under
  // loaders that keep function names (tsx, which `npm start` uses), measurable at lock-cycle rates.
  const pinAndLock = (hash: number, key: ConversationKey) =>
    // One-argument register: Effect then creates no AbortController, measurable at lock-cycle rates.
    Effect.callback<LockSession, PoolExhausted | DatabaseError>((resume) => {
      const attempt: Attempt = { interrupted: false, pinned: false, done: false, wakeInterrupter: undefined }
      const pending = database.pin(reserveTimeoutMs, tryLock(hash))
      pending.promise.then(
        (connection) => {
          attempt.pinned = true
          const session: LockSession = { pinned: connection, hash, locked: "unknown", lost: false, ending: undefined }
          if (attempt.interrupted) return void abandonAttempt(attempt, session, key)
          lockAnswer(connection).then(
            (locked) => {
              session.locked = locked ? "yes" : "no"
              if (attempt.interrupted) return void abandonAttempt(attempt, session, key)
              if (locked) {
                finishAttempt(attempt)
                return resume(Effect.succeed(session))
              }
              // Busy: the session holds nothing, so the connection goes back before the caller hears.
              void endSession(session).then((end) => {
                runLog(reportEnd(end, key, connection.pid))
                finishAttempt(attempt)
                resume(Effect.succeed(session))
              })
            },
            (cause: unknown) => {
              // The lock may or may not have been taken: end the session, then report.
              void endSession(session).then((end) => {
                runLog(reportEnd(end, key, connection.pid))
                finishAttempt(attempt)
                if (!attempt.interrupted) resume(Effect.fail(DatabaseError.fromCause("ConversationLocks.acquire", cause)))
              })
            }
          )
        },
        (error: unknown) => {
          finishAttempt(attempt)
          if (!attempt.interrupted) resume(Effect.fail(error as PoolExhausted | DatabaseError))
        }
      )
      // On interruption: a pending reservation is abandoned (released on arrival); a pinned session is
      // ended first, so the interruption completes only when its connection is settled.
      return Effect.suspend(() => {
        attempt.interrupted = true
        // abandon() is false when the reservation has settled but its handler has not run yet; that
        // handler will see `interrupted` and finish.
        if (!attempt.pinned && pending.abandon()) finishAttempt(attempt)
        return attempt.done
          ? Effect.void
          : Effect.promise(() => new Promise<void>((resolve) => (attempt.wakeInterrupter = resolve)))
      })
    })

  /** While held: the close of the connection is seen at once, a silent death within one keepalive. */
  const watch = (session: LockSession, onLost: (reason: string) => void): Watchdog => {
    const watchdog = new Watchdog(session.pinned, keepaliveMs, onLost)
    session.pinned.onClosed(() => watchdog.lose("the connection closed"))
    return watchdog
  }

  /** What one acquire has taken so far; its single finalizer gives back exactly that. */
  interface Acquisition {
    readonly slot: Slot
    readonly key: ConversationKey
    session: LockSession | undefined
    watchdog: Watchdog | undefined
  }

  /**
   * Step 5, then the count: stop the watchdog, end the session (unlock, then return or destroy the
   * connection), and count down last, on every path (a throw included), so nothing can skip it.
   */
  const release = (acquisition: Acquisition) =>
    Effect.promise((): Promise<void> => {
      const { slot, session } = acquisition
      let ending: Promise<SessionEnd> | undefined
      try {
        acquisition.watchdog?.stop()
        ending = session === undefined ? undefined : endSession(session)
      } catch (error) {
        countDownSync(slot)
        return Promise.reject(error)
      }
      if (ending === undefined || session === undefined) {
        countDownSync(slot)
        return Promise.resolve()
      }
      // endSession never rejects; the count still comes down on either path, and before the report.
      return ending.then((end) => {
        countDownSync(slot)
        if (hasProblems(end)) runLog(reportEnd(end, acquisition.key, session.pinned.pid))
      }, (error: unknown) => {
        countDownSync(slot)
        throw error
      })
    })

  const hold = (acquisition: Acquisition, session: LockSession): ConversationLock => {
    const { key, slot } = acquisition
    const backendPid = session.pinned.pid
    // Made on first use: most holders never ask, and the lock cycle is a hot path.
    let lost: Deferred.Deferred<LockLost> | undefined
    let lossSeen: LockLost | undefined
    pinnedInUse.add(session.pinned)
    acquisition.watchdog = watch(session, (reason) => {
      session.lost = true
      counters.lost++
      lossSeen = new LockLost({ ...key, backendPid, reason })
      if (lost !== undefined) Deferred.doneUnsafe(lost, Effect.succeed(lossSeen))
      runLog(Effect.logWarning("Conversation lock lost").pipe(
        Effect.annotateLogs({ module: "runlane/ConversationLocks", ...key, backendPid, reason })
      ))
    })
    slot.state = "held"
    slot.acquiredAt = Date.now()
    inFlight--
    heldSlots.add(slot)
    counters.acquired++
    return {
      key,
      advisoryKey: [namespace, session.hash] as const,
      backendPid,
      acquiredAt: slot.acquiredAt,
      isLost: Effect.sync(() => session.lost),
      awaitLost: Effect.suspend(() => {
        if (lost === undefined) {
          lost = Deferred.makeUnsafe<LockLost>()
          if (lossSeen !== undefined) Deferred.doneUnsafe(lost, Effect.succeed(lossSeen))
        }
        return Deferred.await(lost)
      })
    }
  }

  // Few Effect steps on purpose: each one is measurable at lock-cycle rates (see the note on `make`).
  const acquire = (key: ConversationKey): Effect.Effect<ConversationLock, AcquireError, Scope.Scope> =>
    Effect.uninterruptibleMask((restore) =>
      Effect.flatMap(takeSlot, (slot) => {
        const scopedKey: ConversationKey = {
          organizationId: key.organizationId,
          agentId: key.agentId,
          conversationId: key.conversationId
        }
        const acquisition: Acquisition = { slot, key: scopedKey, session: undefined, watchdog: undefined }
        return Effect.addFinalizer(() => release(acquisition)).pipe(
          // Steps 3 and 4, interruptible.
          Effect.andThen(restore(pinAndLock(conversationLockHash(scopedKey), scopedKey))),
          Effect.flatMap((session) => {
            acquisition.session = session
            if (session.locked === "yes") return Effect.succeed(hold(acquisition, session))
            counters.busy++
            return Effect.fail(new ConversationBusy(scopedKey))
          })
        )
      })
    )

  const withLock = <A, E, R>(key: ConversationKey, f: (lock: ConversationLock) => Effect.Effect<A, E, R>) =>
    Effect.scoped(
      Effect.flatMap(acquire(key), (lock) =>
        Effect.raceFirst(f(lock), Effect.flatMap(lock.awaitLost, (loss) => Effect.fail(loss))))
    )

  const localUsage = Effect.sync((): LocalLockUsage => {
    let oldest: number | null = null
    for (const slot of heldSlots) if (oldest === null || slot.acquiredAt < oldest) oldest = slot.acquiredAt
    return {
      held: heldSlots.size,
      inFlight,
      cap,
      nearCap: count >= threshold,
      oldestHoldMs: oldest === null ? null : Date.now() - oldest,
      ...counters
    }
  })

  const usage = Effect.gen(function*() {
    const local = yield* localUsage
    const pids = [...pinnedInUse].map((pinned) => pinned.pid).filter((pid) => pid !== 0)
    const [row] = yield* database.use("ConversationLocks.usage", (sql) =>
      sql<Array<{ ours: number; total: number }>>`
        select count(*) filter (where l.pid = any(${pids}::int[]) or a.application_name = ${database.applicationName})::int as ours,
               count(*)::int as total
          from pg_locks l
          left join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.classid = ${namespaceOid}::oid and l.objsubid = 2 and l.granted`)
    return { ...local, heldInDatabaseByThisProcess: row?.ours ?? 0, heldInDatabase: row?.total ?? 0 }
  })

  return ConversationLocks.of({ acquire, withLock, localUsage, usage })
})
