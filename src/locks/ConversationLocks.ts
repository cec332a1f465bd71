/**
 * ConversationLocks: at most one holder per (organization, agent, conversation) across every process
 * sharing the database, through a session advisory lock held on a pinned pool connection.
 *
 * `acquire` is short on purpose; every step is load-bearing:
 * 1. an acquire on a closed scope takes nothing;
 * 2. admit under the cap (LockCapReached leaves the count alone), counting the attempt at once so
 *    concurrent acquirers see each other;
 * 3. a LockSession pins a connection (within the reserve timeout) whose first query takes the lock;
 * 4. the attempt is guarded by a child of the caller's scope: if that scope closes while the attempt
 *    waits, the session ends. A refused, failed or interrupted attempt ends its session (count given
 *    back, connection returned or terminated) before acquire returns and removes its guard; only a held
 *    lock keeps one, which releases it when the caller's scope closes.
 * The release path (unlock, return or terminate, count down) is LockSession's; see lockSession.ts.
 */
import { Config, Context, Deferred, Effect, Exit, Layer, Option, Scope } from "effect"
import { Database } from "../db/Database.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"
import { PinnedConnections } from "../db/PinnedConnections.ts"
import type { PoolExhausted } from "../db/PoolExhausted.ts"
import { assertSessionPooling } from "../db/sessionPooling.ts"
import { capVariable, resolveLockCap } from "./lockCap.ts"
import { LockCounter } from "./lockCounter.ts"
import { ConversationBusy, LockCapReached, LockConfigError, LockLost, refusal } from "./lockErrors.ts"
import { type ConversationKey, conversationLockHash, defaultLockNamespace, isLockNamespace } from "./lockKey.ts"
import { type LockContext, type LockOutcome, LockSession } from "./lockSession.ts"
import { describeProblems, reportSessionEnd } from "./lockReports.ts"
import { type LocalLockUsage, type LockUsage, lockUsage } from "./lockUsage.ts"

export { ConversationBusy, LockCapReached, LockConfigError, LockLost }
export { SessionPoolingRequired } from "../db/sessionPooling.ts"
export type { LocalLockUsage, LockUsage }

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

export interface ConversationLocksOptions {
  /** Most connections this process may pin at once; 0 refuses every acquire. */
  readonly cap: number
  /** First int4 of every conversation lock. Defaults to "rlck" (0x726c636b). */
  readonly namespace?: number
  /** Longest wait for a pool connection, and for the lock query's answer. Defaults to 5,000 ms. */
  readonly reserveTimeoutMs?: number
  /** A silent session death is reported within this. Defaults to 5,000 ms. */
  readonly keepaliveMs?: number
  /** Bound on each unlock attempt. Defaults to 2,000 ms. */
  readonly releaseTimeoutMs?: number
  /**
   * Bound on each attempt to terminate a session that may still hold a lock: a new connection outside
   * the pool, `pg_terminate_backend`, then the close being seen. Defaults to 5,000 ms.
   */
  readonly terminateTimeoutMs?: number
}

export const defaults = { reserveTimeoutMs: 5_000, keepaliveMs: 5_000, releaseTimeoutMs: 2_000, terminateTimeoutMs: 5_000 } as const

/** Waits before the second and third unlock attempts. */
const unlockBackoffMs = [100, 200] as const
/** A stranded session's terminate is retried after 0.5 s, doubling up to 30 s, until it closes. */
const terminateBackoffMs = { first: 500, max: 30_000 } as const

export class ConversationLocks extends Context.Service<ConversationLocks, {
  /** Holds the conversation's lock for the life of the caller's scope. */
  readonly acquire: (key: ConversationKey) => Effect.Effect<ConversationLock, AcquireError, Scope.Scope>
  /** Runs `f` while holding the lock; if the session dies meanwhile, `f` is interrupted and the result is LockLost. */
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
    Layer.effect(ConversationLocks, make(options))

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
      if (resolution.cap > 0) {
        yield* Effect.scoped(Effect.flatMap(database.reserve(reserveTimeoutMs), (pinned) =>
          assertSessionPooling("conversation locks", pinned, database.sql, reserveTimeoutMs)))
      }
      return yield* make({ cap: resolution.cap, namespace, reserveTimeoutMs, keepaliveMs })
    })
  )
}

const positiveMilliseconds = Effect.fnUntraced(function*(variable: string, fallback: number) {
  const value = yield* Config.Int(variable).pipe(Config.withDefault(fallback))
  if (value > 0) return value
  return yield* new LockConfigError({ variable, message: `${variable}=${value} must be a positive number of milliseconds` })
})

const make = Effect.fnUntraced(function*(options: ConversationLocksOptions) {
  const database = yield* Database
  const pins = yield* PinnedConnections
  const namespace = options.namespace ?? defaultLockNamespace
  // For logging from promise callbacks (the watchdog, session ends) through the host's logger.
  const runLog = Effect.runForkWith(yield* Effect.context<never>())
  const annotate = Effect.annotateLogs({ module: "runlane/ConversationLocks" })
  const counter = new LockCounter(options.cap)
  const counters = { acquired: 0, busy: 0, capReached: 0, lost: 0 }
  const keys = new WeakMap<LockSession, ConversationKey>()
  const losses = new WeakMap<LockSession, Deferred.Deferred<LockLost>>()
  let closing = false

  const context: LockContext = {
    pins,
    counter,
    namespace,
    reserveTimeoutMs: options.reserveTimeoutMs ?? defaults.reserveTimeoutMs,
    keepaliveMs: options.keepaliveMs ?? defaults.keepaliveMs,
    releaseTimeoutMs: options.releaseTimeoutMs ?? defaults.releaseTimeoutMs,
    terminateTimeoutMs: options.terminateTimeoutMs ?? defaults.terminateTimeoutMs,
    unlockBackoffMs,
    terminateBackoffMs,
    now: Date.now,
    live: new Set(),
    isClosing: () => closing,
    // A clean end logs nothing, so it starts no fiber either (this runs once per lock cycle).
    onEnd: (session, end) => {
      if (describeProblems(end).length > 0) runLog(reportSessionEnd(end, keys.get(session)!, session.backendPid).pipe(annotate))
    },
    onLost: (session, reason) => {
      counters.lost++
      const loss = new LockLost({ ...keys.get(session)!, backendPid: session.backendPid, reason })
      Deferred.doneUnsafe(losses.get(session)!, Effect.succeed(loss))
      runLog(Effect.logWarning("Conversation lock lost").pipe(
        Effect.annotateLogs({ ...keys.get(session)!, backendPid: session.backendPid, reason }),
        annotate
      ))
    },
    onStrandedEnded: (session, how) =>
      runLog(
        (how === "ended"
          ? Effect.logInfo("Stranded lock session ended")
          : Effect.logWarning("Stranded lock session left to the pool's end at shutdown")).pipe(
            Effect.annotateLogs({ ...keys.get(session)!, backendPid: session.backendPid }),
            annotate
          )
      )
  }
  // Holders' scopes normally close before this layer; a lock still counted here outlived its service.
  yield* Effect.addFinalizer(() =>
    Effect.suspend(() => {
      closing = true
      return counter.count === 0
        ? Effect.logInfo("Conversation locks closed: none held")
        : Effect.logWarning("Conversation locks closed with sessions still counted").pipe(
          Effect.annotateLogs({ held: counter.held, inFlight: counter.inFlight, stranded: counter.stranded })
        )
    }).pipe(annotate)
  )

  /** Step 2: admits the attempt under the cap and starts its session. */
  const admit = (key: ConversationKey) =>
    Effect.suspend(() => {
      const admission = counter.enter(Date.now())
      if (admission === "full") {
        counters.capReached++
        return Effect.fail(refusal(() => new LockCapReached({ count: counter.count, cap: counter.cap })))
      }
      const session = new LockSession(context, conversationLockHash(key))
      keys.set(session, key)
      // Made now, before any callback of the session can run: a loss may be seen before the holder hears.
      losses.set(session, Deferred.makeUnsafe<LockLost>())
      const started = Effect.succeed(session)
      if (admission === "admitted") return started
      return Effect.logWarning("Conversation locks near cap").pipe(
        Effect.annotateLogs({ count: counter.count, cap: counter.cap }),
        annotate,
        Effect.andThen(started)
      )
    })

  const endSession = (session: LockSession) => Effect.promise(() => session.end())

  /** Step 3: waits for the attempt's outcome; interrupted, it ends the session and waits for that. */
  const outcomeOf = (session: LockSession) =>
    Effect.callback<LockOutcome>((resume) => {
      void session.outcome.then((outcome) => resume(Effect.succeed(outcome)))
      return endSession(session)
    })

  const handleOf = (session: LockSession, key: ConversationKey): ConversationLock => {
    counters.acquired++
    const lost = losses.get(session)!
    return {
      key,
      advisoryKey: [namespace, session.hash] as const,
      backendPid: session.backendPid,
      acquiredAt: session.acquiredAt,
      isLost: Effect.sync(() => session.lost),
      awaitLost: Deferred.await(lost)
    }
  }

  const decide = (session: LockSession, key: ConversationKey, outcome: LockOutcome): Effect.Effect<ConversationLock, AcquireError> => {
    switch (outcome._tag) {
      case "Held":
        // The caller's scope may have closed between the grant and this step: the session is ending.
        return session.isHeld ? Effect.succeed(handleOf(session, key)) : Effect.interrupt
      case "Busy":
        counters.busy++
        return Effect.fail(refusal(() => new ConversationBusy(key)))
      case "Failed":
        return Effect.fail(outcome.error)
      case "Ended":
        // The caller's scope closed while the attempt waited: nothing is held, the caller's work is over.
        return Effect.interrupt
    }
  }

  const acquire = (key: ConversationKey): Effect.Effect<ConversationLock, AcquireError, Scope.Scope> =>
    Effect.uninterruptibleMask((restore) =>
      Effect.gen(function*() {
        const scope = yield* Scope.Scope
        if (scope.state._tag === "Closed") return yield* Effect.interrupt
        const ownKey: ConversationKey = { organizationId: key.organizationId, agentId: key.agentId, conversationId: key.conversationId }
        const session = yield* admit(ownKey)
        const guard = yield* Scope.fork(scope)
        yield* Scope.addFinalizer(guard, endSession(session))
        const exit = yield* Effect.exit(Effect.flatMap(restore(outcomeOf(session)), (outcome) => decide(session, ownKey, outcome)))
        if (Exit.isFailure(exit)) yield* Scope.close(guard, exit)
        return yield* exit
      })
    )

  const withLock = <A, E, R>(key: ConversationKey, f: (lock: ConversationLock) => Effect.Effect<A, E, R>) =>
    Effect.scoped(
      Effect.flatMap(acquire(key), (lock) =>
        Effect.raceFirst(f(lock), Effect.flatMap(lock.awaitLost, (loss) => Effect.fail(loss))))
    )

  const usage = lockUsage({ database, counter, counters, live: context.live, namespace })

  return ConversationLocks.of({ acquire, withLock, localUsage: usage.local, usage: usage.reconciled })
})
