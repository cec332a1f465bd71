/**
 * RunWorker: the work loop. `start` runs a handler over one queue with a fixed concurrency, for the life
 * of the caller's scope.
 *
 * Modes, each entered only from the one before:
 * - running: the producer claims in batches sized to its free slots (never more runs than slots), then
 *   waits for a NOTIFY of its queue, a freed slot or the poll interval, whichever comes first; it never
 *   claims again without one of them, so it cannot spin. Finished handlers' settles are flushed in
 *   batches: whatever finished while the previous flush ran goes in the next one.
 * - stopping (the scope closes): the producer claims nothing new and ends; running handlers get
 *   `stopTimeoutMs` to finish; the rest are interrupted and their runs released; the last settles are
 *   flushed.
 * A heartbeat fiber moves the leases of every claimed run forward every `heartbeatMs` and sweeps expired
 * claims; a run found lost (LeaseLost) or cancelled has its handler interrupted and is not settled.
 * A run with a conversation runs under the conversation's lock when ConversationLocks is provided: the
 * lock is taken before the handler starts and kept for the conversation's next runs (conversationSeats.ts);
 * a conversation held elsewhere, or the lock cap reached, defers the run by `busyDeferMs` without
 * spending an attempt; a lock lost mid-run interrupts the handler and releases the run, never completing
 * it. The handler also gets the conversation's latest completed transcript (with TranscriptSnapshots) and
 * the run's worker token (with WorkerTokens).
 */
import { Cause, Config, Context, Deferred, Effect, Exit, Fiber, Layer, Option, Queue, Scope } from "effect"
import { Database } from "../db/Database.ts"
import { DatabaseError } from "../db/DatabaseError.ts"
import { type ConversationLock, ConversationLocks } from "../locks/ConversationLocks.ts"
import { type ConversationKey, conversationLockHash } from "../locks/lockKey.ts"
import { WorkerTokens } from "../ownership/WorkerTokens.ts"
import { TranscriptSnapshots } from "../snapshots/TranscriptSnapshots.ts"
import { makeConversationSeats } from "./conversationSeats.ts"
import type { ClaimedRun } from "./claimRuns.ts"
import { type DeferReason, dispatchMetricsFor } from "./dispatchMetrics.ts"
import { makeObservedStarts } from "./observedStarts.ts"
import { InvalidRunsArgument } from "./runErrors.ts"
import { maxDelayMs, RunsQueue, type SettleOutcome } from "./RunsQueue.ts"
import { conversationWantedChannel, runsChannel } from "./runsChannel.ts"
import { largestLiteralLimit } from "./sql/claimEligibility.ts"

/** What a handler gets. */
export interface RunHandlerInput {
  readonly run: ClaimedRun
  /** The conversation's lock, held for the whole handler; undefined without a conversation or without locks. */
  readonly lock: ConversationLock | undefined
  /** The conversation's latest completed transcript, to hydrate from; none without one (or without snapshots). */
  readonly transcript: Option.Option<string>
  /** The run's worker token, to upload its transcript; undefined without a conversation or without tokens. */
  readonly token: string | undefined
}

/** What a handler may answer besides success: run again later without spending an attempt, or now. */
export type HandlerOutcome =
  | void
  | { readonly _tag: "Defer"; readonly delayMs: number }
  | { readonly _tag: "Release" }

export interface RunWorkerOptions<R> {
  readonly queue: string
  /** Success completes the run; a failure or defect fails it (retry or `failed`) with its message. */
  readonly handler: (input: RunHandlerInput) => Effect.Effect<HandlerOutcome, unknown, R>
  /** Handlers running at once, 1 to 1,000. Defaults to 10. */
  readonly concurrency?: number | undefined
  /** Longest wait between claims when no NOTIFY arrives. Defaults to 2,000 ms. */
  readonly pollIntervalMs?: number | undefined
  /** How long stopping waits for running handlers before interrupting them. Defaults to 30,000 ms. */
  readonly stopTimeoutMs?: number | undefined
}

export const workerDefaults = { concurrency: 10, pollIntervalMs: 2_000, stopTimeoutMs: 30_000 } as const

/**
 * Conversation seats: RUNLANE_CONVERSATION_IDLE_MS (a held conversation with no run for this long is let
 * go; default 30 s), RUNLANE_CONVERSATION_MAX_HOLD_MS (one held longer is let go after its run; default
 * an hour, as the reference system's conversation workers), and how long a run whose conversation is
 * busy, or whose lock the cap refused, waits before it is claimable again (1 s).
 */
export const conversationDefaults = { idleMs: 30_000, maxHoldMs: 3_600_000, busyDeferMs: 1_000 } as const

/** A run's conversation lock key: organization, agent (none is '', as in the claim) and conversation. */
const conversationOf = (run: ClaimedRun): ConversationKey | undefined =>
  run.conversationId === null
    ? undefined
    : { organizationId: run.organizationId, agentId: run.agentId ?? "", conversationId: run.conversationId }

/** After a failed claim or settle, the loop waits this long before trying again, so an outage is not hammered. */
const retryAfterErrorMs = 1_000

/**
 * One claim of a run by this worker, from the claim until its settle commits. A run can be claimed
 * again by this same process (its lease ran out and a sweep returned it), so everything is keyed by
 * the claim, not the run id: an old claim's end never frees the new one's slot, and its settle carries
 * the old claim token, which no longer matches in the database.
 */
interface Claim {
  readonly run: ClaimedRun
  fiber: Fiber.Fiber<void> | undefined
  /** Set when the worker interrupts the handler, to say why. */
  reason: InterruptReason | undefined
  /** Its settle is queued or running: the settle, not the heartbeat, reports it lost. */
  settling: boolean
  /**
   * Its loss or cancellation has been counted in the metrics. A settle and a heartbeat can both find
   * the run gone (a heartbeat applies a cancellation while the completion is queued, and either answer
   * may be read first): whichever is read first counts it, so each claim counts once.
   */
  counted: boolean
  /** Handlers of earlier claims of the same run, still ending: this claim's handler waits for them all. */
  readonly after: ReadonlyArray<Fiber.Fiber<void>>
}

type Settle =
  | { readonly _tag: "Complete"; readonly claim: Claim }
  | { readonly _tag: "Fail"; readonly claim: Claim; readonly error: string }
  | { readonly _tag: "Defer"; readonly claim: Claim; readonly delayMs: number; readonly reason: DeferReason }
  | { readonly _tag: "Release"; readonly claim: Claim }

/** Completions and free slots up to this are settled and claimed in one statement (see the producer). */
const largestCombinedBatch = largestLiteralLimit

/** The worker's own answer for a run whose conversation it could not take: deferred, no attempt spent. */
class SeatRefused {
  constructor(readonly reason: DeferReason) {}
}

/** Why a handler was interrupted: lost and cancelled runs are not settled; stopped ones are released. */
type InterruptReason = "lost" | "cancelled" | "stop"

/** Text of anything a handler may fail with or answer; never throws (a getter or toString may). */
const printable = (value: unknown): string => {
  try {
    if (value instanceof Error) return `${value.name}: ${value.message}`
    if (typeof value === "object" && value !== null && "_tag" in value) return String((value as { _tag: unknown })._tag)
    if (typeof value === "object" && value !== null) return JSON.stringify(value) ?? Object.prototype.toString.call(value)
    return String(value)
  } catch {
    return Object.prototype.toString.call(value)
  }
}

/** The error text stored with a failed attempt. */
const describeFailure = (cause: Cause.Cause<unknown>): string => printable(Cause.squash(cause))

const isDelay = (delayMs: unknown): boolean =>
  typeof delayMs === "number" && Number.isFinite(delayMs) && delayMs >= 0 && delayMs <= maxDelayMs

/** Runs whose first start this process remembers (observedStarts.ts). */
const observedStartsLimit = 10_000

const checkCount = (argument: string, value: number, min: number, max: number) =>
  Number.isInteger(value) && value >= min && value <= max
    ? undefined
    : new InvalidRunsArgument({ argument, message: `must be a whole number from ${min} to ${max}, got ${value}` })

export class RunWorker extends Context.Service<RunWorker, {
  /** Starts working `options.queue`; closing the caller's scope stops it gracefully. */
  readonly start: <R>(options: RunWorkerOptions<R>) => Effect.Effect<void, InvalidRunsArgument, Scope.Scope | R>
  /** Conversations this process's workers hold right now (in use or kept idle); 0 without locks. */
  readonly conversationsServed: Effect.Effect<number>
}>()("runlane/RunWorker") {
  /** One LISTEN connection per process (postgres.js's listener of the pool), shared by every worker. */
  static readonly layer = Layer.effect(
    RunWorker,
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql } = yield* Database
      const locks = yield* Effect.serviceOption(ConversationLocks)
      const snapshots = yield* Effect.serviceOption(TranscriptSnapshots)
      const tokens = yield* Effect.serviceOption(WorkerTokens)
      const idleMs = yield* Config.Int("RUNLANE_CONVERSATION_IDLE_MS").pipe(Config.withDefault(conversationDefaults.idleMs))
      const maxHoldMs = yield* Config.Int("RUNLANE_CONVERSATION_MAX_HOLD_MS").pipe(
        Config.withDefault(conversationDefaults.maxHoldMs)
      )
      const badSeat = checkCount("RUNLANE_CONVERSATION_IDLE_MS", idleMs, 0, 86_400_000) ??
        checkCount("RUNLANE_CONVERSATION_MAX_HOLD_MS", maxHoldMs, 0, 86_400_000)
      if (badSeat !== undefined) return yield* badSeat
      const seats = Option.isSome(locks)
        ? yield* makeConversationSeats(locks.value, { idleMs, maxHoldMs })
        : undefined
      const wakers = new Map<string, Set<() => void>>()
      yield* Effect.acquireRelease(
        Effect.tryPromise({
          try: () => sql.listen(runsChannel, (payload) => wakers.get(payload)?.forEach((wake) => wake())),
          catch: (cause) => DatabaseError.fromCause("RunWorker.listen", cause)
        }),
        (listening) => Effect.promise(() => listening.unlisten()).pipe(Effect.timeoutOption(2_000), Effect.ignore)
      )
      if (seats !== undefined) {
        // Requests from other processes for conversations kept here, handled one at a time.
        const wanted = yield* Queue.sliding<number>(1_000)
        yield* Effect.forkScoped(Effect.forever(Effect.flatMap(Queue.take(wanted), seats.letGoIfIdle)))
        yield* Effect.acquireRelease(
          Effect.tryPromise({
            try: () => sql.listen(conversationWantedChannel, (payload) => void Queue.offerUnsafe(wanted, Number(payload))),
            catch: (cause) => DatabaseError.fromCause("RunWorker.listen", cause)
          }),
          (listening) => Effect.promise(() => listening.unlisten()).pipe(Effect.timeoutOption(2_000), Effect.ignore)
        )
      }
      /** Asks whichever process keeps `key` idle to let it go; best effort (a lost request costs one more deferral). */
      const announceWanted = (key: ConversationKey) =>
        Effect.tryPromise(() => sql`select pg_notify(${conversationWantedChannel}, ${String(conversationLockHash(key))})`).pipe(
          Effect.ignore
        )
      const observedStarts = makeObservedStarts(observedStartsLimit)
      const start = <R>(options: RunWorkerOptions<R>) =>
        Effect.gen(function*() {
          const concurrency = options.concurrency ?? workerDefaults.concurrency
          const pollIntervalMs = options.pollIntervalMs ?? workerDefaults.pollIntervalMs
          const stopTimeoutMs = options.stopTimeoutMs ?? workerDefaults.stopTimeoutMs
          const bad = checkCount("concurrency", concurrency, 1, 1_000) ??
            checkCount("pollIntervalMs", pollIntervalMs, 1, 3_600_000) ??
            checkCount("stopTimeoutMs", stopTimeoutMs, 0, 3_600_000)
          if (bad !== undefined) return yield* bad

          const metrics = dispatchMetricsFor(options.queue)
          const scope = yield* Scope.make()
          const signal = yield* Queue.sliding<void>(1)
          const settleSignal = yield* Queue.sliding<void>(1)
          const wake = () => void Queue.offerUnsafe(signal, undefined)
          // This worker's claims by run id, from the claim until their settle commits: the slots in use.
          const claims = new Map<number, Claim>()
          // Handler fibers by run id, until each has ended: a claim of a run waits for every earlier one.
          const fibersOf = new Map<number, Set<Fiber.Fiber<void>>>()
          const pending: Array<Settle> = []
          // Completions the producer settles in its next claim statement (one round trip for both), while
          // it runs; once stopping, completions go to `pending` like every other settle.
          const completesForClaim: Array<Extract<Settle, { _tag: "Complete" }>> = []
          let stopping = false
          let drained: Deferred.Deferred<void> | undefined

          const freeSlot = (claim: Claim) => {
            if (claims.get(claim.run.id) !== claim) return
            claims.delete(claim.run.id)
            if (drained !== undefined && claims.size === 0) Deferred.doneUnsafe(drained, Effect.void)
            wake()
          }
          const settleLater = (settle: Settle) => {
            settle.claim.settling = true
            if (settle._tag === "Complete" && !stopping) {
              completesForClaim.push(settle)
              wake()
              return
            }
            pending.push(settle)
            Queue.offerUnsafe(settleSignal, undefined)
          }

          /** Completions the producer will not settle: queued for the settler's own statement. */
          const settleApart = (completes: ReadonlyArray<Settle>) => {
            if (completes.length === 0) return
            pending.push(...completes)
            Queue.offerUnsafe(settleSignal, undefined)
          }

          /**
           * How many of `settles` a settle found lost, counting each claim once: not one whose fate was
           * already told (interrupted as lost or cancelled by a heartbeat, a stale claim) or counted. A
           * claim interrupted for stopping told nothing: its release finding the run gone counts it.
           * Marks them counted, and the ones the statement cancelled too.
           */
          const newlyLost = (settles: ReadonlyArray<Settle>, outcome: Pick<SettleOutcome, "lost" | "cancelled">) => {
            const lost = new Set(outcome.lost)
            const cancelled = new Set(outcome.cancelled)
            let count = 0
            for (const { claim } of settles) {
              if (cancelled.has(claim.run.id)) claim.counted = true
              if (!lost.has(claim.run.id) || claim.reason === "lost" || claim.reason === "cancelled" || claim.counted) continue
              claim.counted = true
              count++
            }
            return count
          }

          /** After a statement settled `completes`: their slots are free, and the metrics say how it went. */
          const completesSettled = (completes: ReadonlyArray<Settle>, outcome: SettleOutcome) =>
            Effect.suspend(() => {
              for (const settle of completes) freeSlot(settle.claim)
              return Effect.all([
                metrics.completed(outcome.settled.length),
                metrics.lost(newlyLost(completes, outcome)),
                metrics.cancelled(outcome.cancelled.length)
              ], { discard: true })
            })

          /**
           * Settles everything finished so far, one statement per kind. A kind whose statement failed is
           * put back and retried after a pause; the kinds that committed are not run again.
           */
          // Uninterruptible: a batch taken from `pending` is settled or put back, never dropped.
          const flush = Effect.uninterruptible(Effect.gen(function*() {
            // Not a settle of a claim the run has since been claimed again by: it would match nothing, and
            // beside the new claim's settle (a failed statement puts its batch back after the new claim
            // dropped the queued ones) the run's answer would count for both.
            const batch = pending.splice(0).filter(({ claim }) => {
              const current = claims.get(claim.run.id)
              return current === undefined || current === claim
            })
            if (batch.length === 0) return
            const of = <T extends Settle["_tag"]>(tag: T) => batch.filter((s): s is Extract<Settle, { _tag: T }> => s._tag === tag)
            const completes = of("Complete")
            const fails = of("Fail")
            const defers = of("Defer")
            const releases = of("Release")
            const [completed, failed, deferred, released] = yield* Effect.all([
              Effect.exit(queue.completeMany(completes.map((s) => s.claim.run))),
              Effect.exit(queue.failMany(fails.map((s) => ({ run: s.claim.run, error: s.error })))),
              Effect.exit(queue.deferMany(defers.map((s) => ({ run: s.claim.run, delayMs: s.delayMs })))),
              Effect.exit(queue.releaseMany(releases.map((s) => s.claim.run)))
            ])
            const retry: Array<Settle> = []
            const done = <S extends Settle>(settles: ReadonlyArray<S>, exit: Exit.Exit<SettleOutcome, unknown>) => {
              if (Exit.isFailure(exit)) {
                retry.push(...settles)
                return undefined
              }
              // Lost and cancelled runs need nothing more: the database has already decided their fate.
              for (const settle of settles) freeSlot(settle.claim)
              return exit.value
            }
            const outcomes = [done(completes, completed), done(fails, failed), done(defers, deferred), done(releases, released)]
            const [c, f, d, r] = outcomes
            const deferredIds = new Set(d?.settled ?? [])
            yield* Effect.all([
              metrics.completed(c?.settled.length ?? 0),
              metrics.failedAttempts(f?.settled.length ?? 0),
              metrics.released(r?.settled.length ?? 0),
              Effect.forEach(defers.filter((s) => deferredIds.has(s.claim.run.id)), (s) => metrics.deferred(s.reason, 1)),
              metrics.lost(newlyLost(batch, {
                lost: outcomes.flatMap((outcome) => outcome?.lost ?? []),
                cancelled: outcomes.flatMap((outcome) => outcome?.cancelled ?? [])
              })),
              metrics.cancelled(outcomes.reduce((n, outcome) => n + (outcome?.cancelled.length ?? 0), 0))
            ], { discard: true })
            if (retry.length > 0) {
              pending.unshift(...retry)
              const failure = [completed, failed, deferred, released].find(Exit.isFailure)
              yield* Effect.logWarning("Run settle failed; retrying", failure?.cause)
              yield* Effect.sleep(retryAfterErrorMs)
              // Nothing else may signal: the batch is retried on its own.
              Queue.offerUnsafe(settleSignal, undefined)
            }
          }))

          /** What a handler's answer asks for; any answer, even one whose getters throw, gives a settle. */
          const settleOfAnswer = (claim: Claim, outcome: unknown): Settle => {
            try {
              if (outcome instanceof SeatRefused) {
                return { _tag: "Defer", claim, delayMs: conversationDefaults.busyDeferMs, reason: outcome.reason }
              }
              if (outcome === undefined) return { _tag: "Complete", claim }
              if (typeof outcome === "object" && outcome !== null && "_tag" in outcome) {
                if (outcome._tag === "Release") return { _tag: "Release", claim }
                const delayMs = "delayMs" in outcome ? outcome.delayMs : undefined
                // A bad delay would make the batch statement refuse every run in it, so it fails this run alone.
                if (outcome._tag === "Defer" && isDelay(delayMs)) return { _tag: "Defer", claim, delayMs: delayMs as number, reason: "handler" }
              }
            } catch {
              // Falls through: an answer that cannot be read is not one of the three.
            }
            return {
              _tag: "Fail",
              claim,
              error: `the handler answered ${printable(outcome)}: not void, Release, or Defer of 0 ms to a year`
            }
          }

          const settleExit = (claim: Claim, exit: Exit.Exit<HandlerOutcome | SeatRefused, unknown>) =>
            Effect.suspend(() => {
              const { run, reason } = claim
              if (Exit.isSuccess(exit)) {
                settleLater(settleOfAnswer(claim, exit.value))
                return Effect.void
              }
              if (reason === "lost" || reason === "cancelled") return Effect.sync(() => freeSlot(claim))
              if (reason === "stop") return Effect.sync(() => settleLater({ _tag: "Release", claim }))
              // The handler's own failure, defect or interruption (not the worker's): an attempt, by the retry rules.
              const error = Cause.hasInterruptsOnly(exit.cause) ? "the handler was interrupted" : describeFailure(exit.cause)
              settleLater({ _tag: "Fail", claim, error })
              return Cause.hasDies(exit.cause)
                ? Effect.logError("Run handler died; the attempt fails", { runId: run.id, attempt: run.attempts + 1 }, exit.cause)
                : Effect.logWarning("Run handler failed; the attempt fails", { runId: run.id, attempt: run.attempts + 1, error })
            })

          /** The handler under `lock`: a loss interrupts it and the run is released, never completed. */
          const work = (run: ClaimedRun, key: ConversationKey | undefined, lock: ConversationLock | undefined) =>
            Effect.gen(function*() {
              const transcript = key !== undefined && Option.isSome(snapshots)
                ? yield* snapshots.value.latest(key).pipe(
                  Effect.catch((error) => Effect.logWarning("Transcript for hydration not read", error).pipe(Effect.as(Option.none())))
                )
                : Option.none<string>()
              const token = key !== undefined && key.agentId !== "" && Option.isSome(tokens)
                ? yield* tokens.value.mintRunToken(key, run.id)
                : undefined
              if (run.attempts === 0 && observedStarts.firstStart(run.id)) {
                yield* metrics.started(Math.max(0, Date.now() - run.createdAt.getTime()) / 1000)
              }
              const handler = options.handler({ run, lock, transcript, token })
              if (lock === undefined) return yield* handler
              const lost = lock.awaitLost.pipe(
                Effect.tap((loss) => Effect.logWarning("Conversation lock lost mid-run; the run is released", loss)),
                Effect.as<HandlerOutcome>({ _tag: "Release" })
              )
              // A loss seen while hydrating: the handler never starts. Otherwise the loss is raced first,
              // since raceFirst starts its first effect first and a handler may do its work synchronously.
              if (yield* lock.isLost) return yield* lost
              return yield* Effect.raceFirst(lost, handler)
            })

          /** A run with a conversation takes the conversation's seat first; busy or at the cap, it is deferred. */
          const withConversation = (run: ClaimedRun): Effect.Effect<HandlerOutcome | SeatRefused, unknown, R> => {
            const key = conversationOf(run)
            if (key === undefined || seats === undefined) return work(run, key, undefined)
            return seats.withSeat(key, (lock) => Effect.exit(work(run, key, lock))).pipe(
              Effect.matchEffect({
                onFailure: (error): Effect.Effect<SeatRefused> =>
                  error._tag === "ConversationBusy"
                    ? Effect.as(announceWanted(key), new SeatRefused("conversation_busy"))
                    : error._tag === "LockCapReached"
                    ? Effect.succeed(new SeatRefused("lock_cap"))
                    : Effect.logWarning("Conversation lock not taken; the run is deferred", error).pipe(
                      Effect.as(new SeatRefused("lock_error"))
                    ),
                // The handler's own exit, failure or not, as it was.
                onSuccess: (exit) => exit
              })
            )
          }

          // onExit runs on interruption too; the fiber's own failure has been turned into a settle.
          const handle = (claim: Claim) =>
            Effect.andThen(
              Effect.forEach(claim.after, Fiber.await, { discard: true }),
              withConversation(claim.run)
            ).pipe(Effect.onExit((exit) => settleExit(claim, exit)), Effect.exit, Effect.asVoid)

          /**
           * Interrupts the handlers of `targets`, saying why. Stopping waits for them; the heartbeat and
           * the producer do not (a handler slow to end must not hold up every other run's lease or claim).
           */
          const interrupt = (targets: ReadonlyArray<Claim>, reason: InterruptReason, wait: boolean) =>
            Effect.forEach(targets, (claim) => {
              if (claim.fiber === undefined || claim.reason !== undefined) return Effect.void
              claim.reason = reason
              return wait ? Fiber.interrupt(claim.fiber) : Effect.asVoid(Effect.forkIn(Fiber.interrupt(claim.fiber), scope))
            }, { discard: true })

          /**
           * One claim statement at a time per loop. Two lanes, each with a statement of half the slots in
           * flight, were built and measured (one loop of 16 slots, no-op handler, embedded server): on a
           * pool of 2, 6,000-6,750 runs/s against 5,100-5,580; on a pool of 16, as the bench and a
           * service's shared pool give it, 3,900-4,100 against 5,500-5,900, with 160 us of server CPU per
           * run against 90. postgres.js hands each statement to its least recently used idle connection,
           * so the lanes' statements ran on cold backends, and their claims skipped each other's locks.
           */
          const producer = Effect.gen(function*() {
            while (!stopping) {
              // Finished runs ride with the claim: their slots count as free, and one statement settles
              // them and fills the slots (RunsQueue.completeManyAndClaim). Only while both fit the plans
              // PostgreSQL keeps (claimEligibility.ts): with 16 workers it measured 11% faster than a claim
              // and a completeMany in batches of 16, and 15% slower in batches of 50, where the settler's
              // own statement takes them.
              const taken = completesForClaim.splice(0)
              const freed = taken.filter((settle) => claims.get(settle.claim.run.id) === settle.claim).length
              const together = taken.length <= largestCombinedBatch && concurrency - claims.size + freed <= largestCombinedBatch
              const completes = together ? taken : []
              if (!together) settleApart(taken)
              const free = concurrency - claims.size + (together ? freed : 0)
              let claimed = 0
              if (free > 0) {
                // Uninterruptible: a claim whose answer were dropped would leave its runs claimed until
                // their lease ran out. Stopping waits for it and handles what it claimed. A statement that
                // failed settled nothing: its completions go to the settler, whose own statement does not
                // depend on the claim (a claim failing for its own reasons must not hold finished runs).
                const answer = yield* Effect.uninterruptible(
                  queue.completeManyAndClaim(completes.map((settle) => settle.claim.run), options.queue, { limit: free })
                ).pipe(
                  Effect.catch((error) =>
                    Effect.logWarning("Run claim failed", error).pipe(
                      Effect.andThen(Effect.sync(() => settleApart(completes))),
                      Effect.andThen(Effect.sleep(retryAfterErrorMs)),
                      Effect.as(undefined)
                    )
                  )
                )
                if (answer !== undefined) yield* completesSettled(completes, answer.completed)
                const runs = answer?.claimed ?? []
                yield* metrics.claimed(runs.length)
                for (const run of runs) {
                  // Claimed again by this process (its lease ran out and a sweep returned it): the old
                  // handler is a stale claim's. It is interrupted, its completion waiting for the next
                  // claim dropped (it would match nothing; `flush` drops its other settles), and the new
                  // claim's handler starts only once it has ended.
                  const stale = claims.get(run.id)
                  if (stale !== undefined) {
                    yield* Effect.logWarning("Run claimed again after its lease ran out; its earlier handler is interrupted", { runId: run.id })
                    // Its loss is told here unless a heartbeat told it already: the settle that would
                    // have reported it is dropped (below, or by flush), and the heartbeat beats the new claim only.
                    if (stale.reason === undefined && !stale.counted) yield* metrics.lost(1)
                    stale.counted = true
                    yield* interrupt([stale], "lost", false)
                    stale.reason = "lost"
                    for (let i = completesForClaim.length - 1; i >= 0; i--) {
                      if (completesForClaim[i]!.claim === stale) completesForClaim.splice(i, 1)
                    }
                  }
                  // Every fiber of this run still running, whatever became of its claim (a claim that was
                  // itself only waiting may have ended and left `claims`).
                  const claim: Claim = {
                    run,
                    fiber: undefined,
                    reason: undefined,
                    settling: false,
                    counted: false,
                    after: [...(fibersOf.get(run.id) ?? [])]
                  }
                  // The slot is taken before the fork, so a handler that ends at once cannot free it first.
                  claims.set(run.id, claim)
                  const fiber = yield* Effect.forkIn(handle(claim), scope)
                  if (claims.get(run.id) === claim) claim.fiber = fiber
                  const running = fibersOf.get(run.id) ?? new Set()
                  running.add(fiber)
                  fibersOf.set(run.id, running)
                  fiber.addObserver(() => {
                    running.delete(fiber)
                    if (running.size === 0 && fibersOf.get(run.id) === running) fibersOf.delete(run.id)
                  })
                }
                claimed = runs.length
              }
              // No free slot: only completions of stale claims get here (they match nothing), settled apart.
              if (free <= 0 && together) settleApart(completes)
              if (claimed > 0 && claimed === free) continue
              yield* Queue.take(signal).pipe(Effect.timeoutOption(pollIntervalMs))
            }
          })

          const settler = Effect.forever(Queue.take(settleSignal).pipe(Effect.andThen(flush)))

          const heartbeat = Effect.gen(function*() {
            for (;;) {
              yield* Effect.sleep(queue.config.heartbeatMs)
              // Runs whose settle is queued are still beaten: a settle that keeps failing must not let
              // the lease of a finished run run out. Their claim tokens keep a late heartbeat harmless.
              const beating = [...claims.values()].filter((claim) => claim.reason === undefined)
              const outcome = yield* queue.heartbeatMany(beating.map((claim) => claim.run)).pipe(Effect.exit)
              if (Exit.isSuccess(outcome)) {
                const byId = new Map(beating.map((claim) => [claim.run.id, claim]))
                // A run the heartbeat found gone while its settle is queued: the settle reports it. One this
                // heartbeat cancelled whose settle was answered first was counted (lost) by the settle.
                const lost = outcome.value.lost.map((id) => byId.get(id)!).filter((claim) => !claim.settling && !claim.counted)
                const cancelled = outcome.value.cancelled.map((id) => byId.get(id)!).filter((claim) => !claim.counted)
                for (const claim of [...lost, ...cancelled]) claim.counted = true
                // Cancelled by this heartbeat: decided, so a settle still queued does not count it lost too.
                for (const claim of cancelled) if (claim.settling) claim.reason = "cancelled"
                yield* metrics.lost(lost.length)
                yield* metrics.cancelled(cancelled.length)
                yield* interrupt(lost, "lost", false)
                yield* interrupt(cancelled.filter((claim) => !claim.settling), "cancelled", false)
              } else {
                yield* Effect.logWarning("Run heartbeat failed", outcome.cause)
              }
              yield* queue.sweep.pipe(Effect.catchCause((cause) => Effect.logWarning("Run sweep failed", cause)))
            }
          })

          const registered = wakers.get(options.queue) ?? new Set()
          registered.add(wake)
          wakers.set(options.queue, registered)
          const producerFiber = yield* Effect.forkIn(producer, scope)
          const settlerFiber = yield* Effect.forkIn(settler, scope)
          const heartbeatFiber = yield* Effect.forkIn(heartbeat, scope)

          const stop = Effect.gen(function*() {
            stopping = true
            registered.delete(wake)
            wake()
            yield* Fiber.join(producerFiber).pipe(Effect.ignore)
            // Completions the producer did not take: settled like every other settle from now on.
            settleApart(completesForClaim.splice(0))
            drained = yield* Deferred.make<void>()
            if (claims.size > 0) {
              yield* Deferred.await(drained).pipe(Effect.timeoutOption(stopTimeoutMs))
              yield* interrupt([...claims.values()], "stop", true)
            }
            yield* Fiber.interrupt(settlerFiber)
            yield* Fiber.interrupt(heartbeatFiber)
            // The settler may have been interrupted mid-flush; whatever it had not settled is pending again.
            for (let round = 0; pending.length > 0 && round < 3; round++) yield* flush
            yield* Scope.close(scope, Exit.void)
            // Last, once its runs are settled: the conversations kept idle (a seat another worker of this
            // process is using is not let go).
            if (seats !== undefined) yield* seats.letGoIdle
          })
          yield* Effect.addFinalizer(() => stop)
        }).pipe(Effect.annotateLogs({ module: "runlane/RunWorker", queue: options.queue }))

      return RunWorker.of({ start, conversationsServed: seats === undefined ? Effect.succeed(0) : seats.served })
    })
  )
}
