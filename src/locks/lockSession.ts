/**
 * One acquire's pinned session, from the moment it is admitted under the cap until it is known to hold
 * nothing. It owns its count and its single, memoized end; the service only starts it and asks for it
 * to end.
 *
 * Phases, each entered only from the one before it:
 * - reserving: waiting for a pool connection (PoolExhausted after the reserve timeout);
 * - locking: pinned, its first query (pg_backend_pid, pg_try_advisory_lock) on its way;
 * - held: the lock is held and a watchdog watches the session;
 * - ending: unlock (bounded retries), then the connection goes back to the pool only if the session
 *   is known to hold nothing; otherwise the session is terminated, never returned;
 * - ended: the count is given back.
 * A session whose termination cannot be confirmed stays counted, as `stranded`, and the terminate is
 * retried with backoff until the connection is seen closed.
 *
 * `end()` may be called in any phase, any number of times: while reserving it abandons the
 * reservation, while locking it lets the lock answer arrive (bounded) and then ends accordingly.
 */
import { DatabaseError } from "../db/DatabaseError.ts"
import { type FirstColumns, type PinnedConnection, PinnedConnectionClosed, withinMs } from "../db/pinnedConnection.ts"
import type { PendingPin, PinnedConnections } from "../db/PinnedConnections.ts"
import type { PoolExhausted } from "../db/PoolExhausted.ts"
import type { CountedState, LockCounter } from "./lockCounter.ts"
import { Watchdog } from "./watchdog.ts"

/** How an acquire attempt came out. "Ended": `end()` was called before it finished. */
export type LockOutcome =
  | { readonly _tag: "Held" }
  | { readonly _tag: "Busy" }
  | { readonly _tag: "Failed"; readonly error: PoolExhausted | DatabaseError }
  | { readonly _tag: "Ended" }

export type UnlockOutcome =
  | "not needed"
  | "unlocked"
  | "session gone"
  /** The lock query's answer never came, or the session stopped answering: it is terminated instead. */
  | "skipped"
  | "not held"
  | { readonly failed: unknown }

export type ConnectionOutcome = "never pinned" | "released" | "terminated" | "stranded" | { readonly releaseFailed: unknown }

export interface SessionEnd {
  readonly unlock: UnlockOutcome
  readonly connection: ConnectionOutcome
}

/** What every session of one ConversationLocks shares. */
export interface LockContext {
  readonly pins: PinnedConnections["Service"]
  readonly counter: LockCounter
  readonly namespace: number
  readonly reserveTimeoutMs: number
  readonly keepaliveMs: number
  /** Bound on each unlock attempt. */
  readonly releaseTimeoutMs: number
  /** Bound on each terminate attempt (a new connection, the terminate, then the close being seen). */
  readonly terminateTimeoutMs: number
  /** Waits before the second and third unlock attempts. */
  readonly unlockBackoffMs: ReadonlyArray<number>
  /** First and longest wait between terminate attempts of a stranded session. */
  readonly terminateBackoffMs: { readonly first: number; readonly max: number }
  readonly now: () => number
  /** Sessions between pinned and ended (for pg_locks reconciliation and the oldest hold). */
  readonly live: Set<LockSession>
  /** true once the service is closing: stranded sessions are then left to the pool's end. */
  readonly isClosing: () => boolean
  readonly onEnd: (session: LockSession, end: SessionEnd) => void
  readonly onLost: (session: LockSession, reason: string) => void
  readonly onStrandedEnded: (session: LockSession, how: "ended" | "left to the pool's end at shutdown") => void
}

type Phase = "reserving" | "locking" | "held" | "ending" | "ended"

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Sleeps without keeping the process alive, waking early (within 100 ms) once the service is closing. */
const sleepUnlessClosing = async (ms: number, isClosing: () => boolean) => {
  const until = Date.now() + ms
  while (!isClosing() && Date.now() < until) {
    await new Promise<void>((resolve) => setTimeout(resolve, Math.min(100, until - Date.now())).unref())
  }
}

const release = (pinned: PinnedConnection): ConnectionOutcome => {
  try {
    pinned.release()
    return "released"
  } catch (releaseFailed) {
    return { releaseFailed }
  }
}

export class LockSession {
  private phase: Phase = "reserving"
  private counted: CountedState | undefined = "inFlight"
  private pinned: PinnedConnection | undefined = undefined
  private locked: "yes" | "no" | "unknown" = "unknown"
  private watchdog: Watchdog | undefined = undefined
  private endRequested = false
  private readonly pending: PendingPin
  private resolveOutcome!: (outcome: LockOutcome) => void
  private resolveEnd!: (end: SessionEnd) => void
  /** Settles once, when the attempt is decided; a refusal only after the session holds nothing. */
  readonly outcome = new Promise<LockOutcome>((resolve) => (this.resolveOutcome = resolve))
  private readonly ended = new Promise<SessionEnd>((resolve) => (this.resolveEnd = resolve))
  lost = false
  acquiredAt = 0

  /** The caller has already admitted this session under the cap (as in flight). */
  constructor(private readonly context: LockContext, readonly hash: number) {
    const first: FirstColumns = {
      columns: "pg_try_advisory_lock($1::int4, $2::int4) as locked",
      parameters: [context.namespace, hash]
    }
    this.pending = context.pins.pin(context.reserveTimeoutMs, first, {
      onPinned: (pinned) => this.onPinned(pinned),
      onFailed: (error) => this.finish({ _tag: "Failed", error }, { unlock: "not needed", connection: "never pinned" })
    })
  }

  get isHeld(): boolean {
    return this.phase === "held"
  }

  /** The session's backend pid, 0 while unknown. */
  get backendPid(): number {
    return this.pinned?.knownPid ?? 0
  }

  /** Ends the session; settles when it holds nothing (or is stranded and being terminated). */
  end(): Promise<SessionEnd> {
    if (this.endRequested) return this.ended
    this.endRequested = true
    // Locking: the lock answer's handler sees endRequested and ends the session itself.
    if (this.phase === "reserving" && this.pending.abandon()) {
      this.finish({ _tag: "Ended" }, { unlock: "not needed", connection: "never pinned" })
    } else if (this.phase === "held") {
      void this.settle()
    }
    return this.ended
  }

  private onPinned(pinned: PinnedConnection): void {
    this.pinned = pinned
    this.phase = "locking"
    this.context.live.add(this)
    withinMs(pinned.firstRow, this.context.reserveTimeoutMs).then(
      // Anything but a boolean is no answer at all: the lock may have been taken.
      (row) => this.onLockAnswer(row["locked"] === true ? "yes" : row["locked"] === false ? "no" : "unknown", row),
      (cause: unknown) => this.onLockAnswer("unknown", cause)
    )
  }

  private onLockAnswer(locked: "yes" | "no" | "unknown", cause: unknown): void {
    this.locked = locked
    if (locked === "yes" && !this.endRequested) {
      if (!this.pinned!.closed) return this.hold()
      // Granted, and the connection closed before it could be held: a failure, and the end confirms it gone.
      cause = new PinnedConnectionClosed(this.pinned!.pid)
    }
    const outcome: LockOutcome = this.endRequested
      ? { _tag: "Ended" }
      : locked === "no"
      ? { _tag: "Busy" }
      : { _tag: "Failed", error: DatabaseError.fromCause("ConversationLocks.acquire", cause) }
    // The caller hears of a refusal only once the session holds nothing and its count is back.
    void this.settle().then(() => this.resolveOutcome(outcome))
  }

  private hold(): void {
    this.phase = "held"
    this.acquiredAt = this.context.now()
    this.context.counter.move("inFlight", "held")
    this.counted = "held"
    this.watchdog = new Watchdog(this.pinned!, this.context.keepaliveMs, (reason) => {
      this.lost = true
      this.context.onLost(this, reason)
    })
    this.resolveOutcome({ _tag: "Held" })
  }

  /** Unlock, then give the connection back or terminate the session, then give the count back. */
  private async settle(): Promise<void> {
    this.phase = "ending"
    this.watchdog?.stop()
    const unlock = await this.unlock()
    const connection = await this.giveBack(unlock)
    this.finish(undefined, { unlock, connection })
  }

  private async unlock(): Promise<UnlockOutcome> {
    const pinned = this.pinned!
    if (this.locked === "no") return "not needed"
    if (pinned.closed) return "session gone"
    if (this.locked === "unknown" || this.lost) return "skipped"
    let lastError: unknown = undefined
    for (let attempt = 0; attempt <= this.context.unlockBackoffMs.length; attempt++) {
      if (attempt > 0) await sleep(this.context.unlockBackoffMs[attempt - 1]!)
      if (pinned.closed) return "session gone"
      try {
        const [row] = await withinMs(
          pinned.query((sql) =>
            sql<Array<{ unlocked: boolean }>>`select pg_advisory_unlock(${this.context.namespace}::int4, ${this.hash}::int4) as unlocked`),
          this.context.releaseTimeoutMs
        )
        return row?.unlocked === true ? "unlocked" : "not held"
      } catch (error) {
        lastError = error
      }
    }
    return { failed: lastError }
  }

  private async giveBack(unlock: UnlockOutcome): Promise<ConnectionOutcome> {
    const pinned = this.pinned!
    const { terminateBackend } = this.context.pins
    const timeoutMs = this.context.terminateTimeoutMs
    if (pinned.closed && this.locked !== "no") {
      // The client saw the connection close, but runlane did not close it: the server session may live
      // on with the lock (a reset on the way, a client-side timeout), so the server must confirm it gone.
      const confirm = () => pinned.confirmEnded(terminateBackend, timeoutMs)
      if (await confirm()) return release(pinned)
      return this.strand(confirm)
    }
    if (pinned.closed || unlock === "not needed" || unlock === "unlocked") return release(pinned)
    const terminate = () => pinned.terminate(terminateBackend, timeoutMs)
    if (await terminate()) return "terminated"
    return this.strand(terminate)
  }

  /**
   * A session that may still hold a lock is never forgotten: it stays counted as stranded, and `attempt`
   * is retried with backoff until it succeeds (or the service closes, leaving it to the pool's end).
   */
  private strand(attempt: () => Promise<boolean>): ConnectionOutcome {
    this.context.counter.move(this.counted!, "stranded")
    this.counted = "stranded"
    void this.retryUntilEnded(attempt)
    return "stranded"
  }

  private async retryUntilEnded(attempt: () => Promise<boolean>): Promise<void> {
    const { first, max } = this.context.terminateBackoffMs
    let ended = false
    for (let delay = first; !ended; delay = Math.min(max, delay * 2)) {
      await sleepUnlessClosing(delay, this.context.isClosing)
      if (this.context.isClosing()) break
      ended = await attempt()
    }
    this.context.counter.leave("stranded", this.context.now())
    this.counted = undefined
    this.context.live.delete(this)
    this.context.onStrandedEnded(this, ended ? "ended" : "left to the pool's end at shutdown")
  }

  private finish(outcome: LockOutcome | undefined, end: SessionEnd): void {
    this.phase = "ended"
    if (this.counted !== undefined && this.counted !== "stranded") {
      this.context.counter.leave(this.counted, this.context.now())
      this.counted = undefined
      this.context.live.delete(this)
    }
    if (outcome !== undefined) this.resolveOutcome(outcome)
    this.context.onEnd(this, end)
    this.resolveEnd(end)
  }
}
