/**
 * Generated programs of acquires, holds, releases, failures and interruptions over a few keys, with a
 * fault injected at every await of the lock's life. After every program the harness checks the end
 * state (count zero, no advisory lock in the namespace, the pool serving DB_POOL_MAX sessions), and
 * during it that no key ever had two holders (pg_locks must name the holder's own session).
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Fiber, Layer, References } from "effect"
import fc from "fast-check"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { type ConversationKey, conversationLockHash } from "../../src/locks/lockKey.ts"
import { expectQuiescent, holdersOf, LockHarness, lockHarnessLayer } from "../support/lockHarness.ts"

const keys: ReadonlyArray<ConversationKey> = [0, 1, 2].map((n) => ({
  organizationId: "org",
  agentId: "agent",
  conversationId: `conversation:${n}`
}))

const faults = [
  "none",
  "reserveThrows",
  "reserveArrivesLate",
  "lockQueryThrows",
  "lockAnswerLost",
  "unlockThrowsOnce",
  "unlockAlwaysThrows",
  "unlockReturnsFalse",
  "releaseThrows",
  "backendTerminated"
] as const
type Fault = (typeof faults)[number]

const endings = ["release", "fail", "interrupt"] as const

interface Actor {
  readonly key: number
  readonly fault: Fault
  readonly ending: (typeof endings)[number]
  readonly startAfterMs: number
  readonly holdMs: number
}

const actor: fc.Arbitrary<Actor> = fc.record({
  key: fc.integer({ min: 0, max: keys.length - 1 }),
  fault: fc.constantFrom(...faults),
  ending: fc.constantFrom(...endings),
  startAfterMs: fc.integer({ min: 0, max: 10 }),
  holdMs: fc.integer({ min: 0, max: 15 })
})

/** Generated programs per CI run. */
const numRuns = 200

const timings = { reserveTimeoutMs: 150, keepaliveMs: 100, lateMs: 250 } as const

const TestLayer = lockHarnessLayer({
  poolMax: 4,
  cap: 3,
  reserveTimeoutMs: timings.reserveTimeoutMs,
  keepaliveMs: timings.keepaliveMs
}).pipe(
  // Finalizer failures are logged by design; hundreds of injected ones would drown the test output.
  Layer.provideMerge(Layer.succeed(References.MinimumLogLevel, "None"))
)

class TwoHolders extends Error {}

layer(TestLayer, { excludeTestServices: true })("ConversationLocks under generated faults", (it) => {
  it.effect(`${numRuns} programs: nothing leaks, no key ever has two holders`, () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      const context = yield* Effect.context<ConversationLocks | LockHarness | Database>()
      const run = Effect.runPromiseWith(context)
      const queue = harness.faults
      queue.lateMs = timings.lateMs

      const inject = (fault: Fault) => {
        switch (fault) {
          case "reserveThrows": return void queue.reserve.push("throw")
          case "reserveArrivesLate": return void queue.reserve.push("late")
          case "lockQueryThrows": return void queue.lock.push("throw")
          case "lockAnswerLost": return void queue.lock.push("throwAfter")
          case "unlockThrowsOnce": return void queue.unlock.push("throw")
          case "unlockAlwaysThrows": return void queue.unlock.push("throw", "throw", "throw")
          case "unlockReturnsFalse": return void queue.unlock.push("false")
          case "releaseThrows": return void queue.release.push("throwAfter")
          default: return
        }
      }

      const runActor = (a: Actor, id: number, holders: Map<number, number>) => {
        const key = keys[a.key]!
        const hold = Effect.scoped(Effect.gen(function*() {
          const lock = yield* locks.acquire(key)
          if (holders.has(a.key)) return yield* Effect.die(new TwoHolders(`key ${a.key} held by ${holders.get(a.key)} and ${id}`))
          holders.set(a.key, id)
          yield* Effect.gen(function*() {
            const inDatabase = yield* holdersOf(conversationLockHash(key))
            if (inDatabase.length !== 1 || inDatabase[0] !== lock.backendPid) {
              return yield* Effect.die(new TwoHolders(`pg_locks shows ${JSON.stringify(inDatabase)} for key ${a.key}, holder ${lock.backendPid}`))
            }
            if (a.fault === "backendTerminated") {
              // Uninterruptible: an interrupt arriving between the terminate and its effect would
              // release the lock and let the terminate kill an innocent pool connection instead.
              // The holder stops counting as one when its session dies: another session may take the
              // lock before this client hears of the death, which is what a lost lock means.
              yield* Effect.uninterruptible(Effect.gen(function*() {
                holders.delete(a.key)
                yield* Effect.promise(() => harness.admin`select pg_terminate_backend(${lock.backendPid})`)
                yield* lock.awaitLost.pipe(Effect.timeout(5_000))
              }))
            }
            yield* Effect.sleep(a.holdMs)
            if (a.ending === "fail") return yield* Effect.fail("the holder's work failed" as const)
          }).pipe(Effect.ensuring(Effect.sync(() => {
            if (holders.get(a.key) === id) holders.delete(a.key)
          })))
        }))
        const attempt = Effect.sleep(a.startAfterMs).pipe(
          Effect.andThen(hold),
          // Expected outcomes of a faulty world; anything else (a defect) fails the property.
          Effect.catchTag(["ConversationBusy", "LockCapReached", "PoolExhausted", "DatabaseError"], () => Effect.void),
          Effect.catch(() => Effect.void)
        )
        if (a.ending !== "interrupt") return attempt
        return Effect.gen(function*() {
          const fiber = yield* Effect.forkChild(attempt)
          yield* Effect.sleep(a.startAfterMs + a.holdMs)
          yield* Fiber.interrupt(fiber)
        })
      }

      yield* Effect.promise(() =>
        fc.assert(
          fc.asyncProperty(fc.array(actor, { minLength: 1, maxLength: 5 }), async (program) => {
            queue.reserve.length = queue.lock.length = queue.unlock.length = queue.release.length = 0
            for (const a of program) inject(a.fault)
            const holders = new Map<number, number>()
            await run(Effect.all(program.map((a, id) => runActor(a, id, holders)), { concurrency: "unbounded" }))
            queue.reserve.length = queue.lock.length = queue.unlock.length = queue.release.length = 0
            await run(expectQuiescent)
          }),
          { numRuns }
        )
      )
      const usage = yield* locks.localUsage
      assert.isAbove(usage.acquired, 0)
      assert.isAbove(usage.lost, 0)
      assert.isAbove(usage.busy, 0)
    }), { timeout: 600_000 })
})
