/**
 * The conversations this process's workers serve: one held conversation lock per conversation, kept
 * across that conversation's consecutive runs (so a conversation is not re-locked for every message)
 * and let go once it has been idle for `idleMs`, once held for `maxHoldMs`, when its session is lost,
 * or at shutdown. The lock cap therefore bounds how many conversations one process serves at once, as
 * the reference system's conversation workers did (they held one for up to an hour).
 *
 * A kept conversation is a cache, not a reservation: when the lock cap is reached, a new conversation
 * takes the place of the seat idle the longest, so conversations that are done do not keep others
 * waiting for their idle period.
 *
 * Across processes, a kept conversation gives way too: a process refused a conversation as busy
 * announces it (NOTIFY `runlane_conversation_wanted` with the conversation's lock hash, through
 * `announceWanted`), and every process keeping that conversation idle lets it go (`letGoIfIdle`). The
 * refused run, deferred by a second, then finds it free instead of waiting out the idle period.
 *
 * A seat is used by one run at a time. A second run of a conversation that is in use here (another
 * queue of the same conversation) is refused as busy, like a conversation held by another process.
 */
import { Effect, Exit, Fiber, Scope } from "effect"
import { type AcquireError, ConversationBusy, type ConversationLock, type ConversationLocks } from "../locks/ConversationLocks.ts"
import { type ConversationKey, conversationLockHash } from "../locks/lockKey.ts"

export interface SeatOptions {
  /** A held conversation with no run for this long is let go. */
  readonly idleMs: number
  /** A conversation held this long is let go after its current run, so others get their turn. */
  readonly maxHoldMs: number
}

interface Seat {
  readonly key: ConversationKey
  readonly lock: ConversationLock
  readonly scope: Scope.Closeable
  readonly since: number
  inUse: boolean
  /** When its last run ended (for choosing which idle seat to let go at the cap). */
  idleSince: number
  idleTimer: Fiber.Fiber<void> | undefined
}

const seatId = (key: ConversationKey) => JSON.stringify([key.organizationId, key.agentId, key.conversationId])

export const makeConversationSeats = Effect.fnUntraced(function*(locks: ConversationLocks["Service"], options: SeatOptions) {
  const seats = new Map<string, Seat>()
  // Idle timers live as long as the seats do; closing this scope (at shutdown) stops them.
  const timers = yield* Effect.acquireRelease(Scope.make(), (scope) => Scope.close(scope, Exit.void))

  /**
   * Lets a seat go, unless it is in use: whoever calls this may have picked the seat before a wait
   * (another seat's unlock), during which a run may have taken it. Off the map at once, so no run
   * takes it while its lock is being released.
   */
  const letGo = (seat: Seat) =>
    Effect.suspend(() => {
      if (seat.inUse || seats.get(seatId(seat.key)) !== seat) return Effect.void
      seats.delete(seatId(seat.key))
      const timer = seat.idleTimer
      seat.idleTimer = undefined
      return Effect.andThen(timer === undefined ? Effect.void : Fiber.interrupt(timer), Scope.close(seat.scope, Exit.void))
    })

  const longestIdle = (): Seat | undefined => {
    let found: Seat | undefined
    for (const seat of seats.values()) {
      if (!seat.inUse && (found === undefined || seat.idleSince < found.idleSince)) found = seat
    }
    return found
  }

  /** After a run: keep the conversation for its next run, or let it go (lost, held long enough). */
  const giveBack = (seat: Seat) =>
    Effect.gen(function*() {
      seat.inUse = false
      seat.idleSince = Date.now()
      if ((yield* seat.lock.isLost) || Date.now() - seat.since >= options.maxHoldMs) return yield* letGo(seat)
      seat.idleTimer = yield* Effect.forkIn(
        // Whichever comes first: the idle period, or the session's loss (a dead seat must not count as served).
        Effect.raceFirst(Effect.sleep(options.idleMs), Effect.asVoid(seat.lock.awaitLost)).pipe(Effect.andThen(Effect.suspend(() => {
          if (seat.inUse) return Effect.void
          // This timer is the fiber letting go: letGo must not interrupt it.
          seat.idleTimer = undefined
          return letGo(seat)
        }))),
        timers
      )
    })

  /**
   * Runs `use` with the conversation's lock held: the seat kept from its last run, or a newly acquired
   * lock (at the cap, after letting go of the seat idle longest). Only the acquire can be interrupted;
   * once the seat is taken, giving it back is guaranteed, so a seat can never stay "in use" for ever.
   */
  const withSeat = <A, E, R>(
    key: ConversationKey,
    use: (lock: ConversationLock) => Effect.Effect<A, E, R>
  ): Effect.Effect<A, E | AcquireError, R> =>
    Effect.uninterruptibleMask((restore) =>
      Effect.gen(function*() {
        const acquireSeat = Effect.gen(function*() {
          const scope = yield* Scope.make()
          const exit = yield* Effect.exit(restore(locks.acquire(key)).pipe(Scope.provide(scope)))
          if (Exit.isFailure(exit)) {
            yield* Scope.close(scope, Exit.void)
            return yield* Effect.failCause(exit.cause)
          }
          const seat: Seat = { key, lock: exit.value, scope, since: Date.now(), inUse: true, idleSince: 0, idleTimer: undefined }
          seats.set(seatId(key), seat)
          return seat
        })
        let seat = seats.get(seatId(key))
        if (seat !== undefined) {
          if (seat.inUse) return yield* new ConversationBusy(key)
          seat.inUse = true
          const timer = seat.idleTimer
          seat.idleTimer = undefined
          if (timer !== undefined) yield* Fiber.interrupt(timer)
        } else {
          // At the cap already: make room first rather than be refused (a refusal counts as a cap hit).
          const usage = yield* locks.localUsage
          const idle = usage.held + usage.inFlight + usage.stranded >= usage.cap ? longestIdle() : undefined
          if (idle !== undefined) yield* letGo(idle)
          seat = yield* acquireSeat.pipe(
            // Another taker filled the room in between: one more try after letting the next idle seat go.
            Effect.catchTag("LockCapReached", (refused) => {
              const next = longestIdle()
              return next === undefined ? Effect.fail(refused) : Effect.andThen(letGo(next), acquireSeat)
            })
          )
        }
        const taken = seat
        return yield* restore(use(taken.lock)).pipe(Effect.ensuring(giveBack(taken)))
      })
    )

  /** Another process wants the conversation(s) with this lock hash: let go of those kept idle here. */
  const letGoIfIdle = (hash: number) =>
    Effect.suspend(() =>
      Effect.forEach(
        [...seats.values()].filter((seat) => !seat.inUse && conversationLockHash(seat.key) === hash),
        letGo,
        { discard: true }
      )
    )

  /** Lets go of every conversation not in use (a worker stopping; every one at shutdown, when none is). */
  const letGoIdle = Effect.suspend(() => Effect.forEach([...seats.values()].filter((seat) => !seat.inUse), letGo, { discard: true }))

  return {
    withSeat,
    letGoIdle,
    letGoIfIdle,
    /** Conversations held right now, in use or idle. */
    served: Effect.sync(() => seats.size)
  }
})

export type ConversationSeats = Effect.Success<ReturnType<typeof makeConversationSeats>>
