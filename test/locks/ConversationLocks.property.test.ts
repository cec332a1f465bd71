/**
 * Generated cases, each placing one fault deliberately: at which await of the lock's life it fires
 * (reserve, the first query that identifies the session and takes the lock, its answer, each unlock
 * attempt, the terminate, the release, the keepalive) and whether it throws, answers wrongly or hangs
 * past its bound; and how the holder ends (its scope closes, its work fails, it is interrupted while
 * holding or while the acquire waits, its scope is closed from another fiber, or it retries a busy
 * conversation several times inside one long-lived scope).
 *
 * Every case asserts that its fault fired, which release outcome followed (from the error log line
 * the session writes), and the end state: held, inFlight and stranded each exactly zero, no advisory
 * lock of the namespace in pg_locks, every pool connection idle and usable, and no warning or error
 * logged except those the case expects.
 */
import { assert, layer } from "@effect/vitest"
import { Deferred, Effect, Exit, Fiber, Scope } from "effect"
import fc from "fast-check"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import type { ConversationKey } from "../../src/locks/lockKey.ts"
import type { FaultQueues } from "../support/faultyClient.ts"
import { eventually, expectQuiescent, LockHarness, lockHarnessLayer } from "../support/lockHarness.ts"

const keys: ReadonlyArray<ConversationKey> = [0, 1].map((n) => ({
  organizationId: "org",
  agentId: "agent",
  conversationId: `property:${n}`
}))

type Queued = Partial<Pick<FaultQueues, "reserve" | "firstQuery" | "unlock" | "keepalive" | "release">>

interface Scenario {
  readonly name: string
  readonly faults: Queued
  readonly terminatePath?: "refuse" | "blackhole"
  /** How the acquire comes out when nothing else holds the key. */
  readonly acquire: "held" | "PoolExhausted" | "DatabaseError"
  /** The fired fault that says the acquire is waiting at its await (for the "pending" endings). */
  readonly waitsAt?: string
  /** While held: the session is lost, by a keepalive with no answer or a terminated backend. */
  readonly loss?: "keepalive" | "backendTerminated"
  /** The connection outcome named by the session's error log line, or "clean" for none. */
  readonly end: "clean" | "terminated" | "stranded" | "release failed"
}

const scenarios: ReadonlyArray<Scenario> = [
  { name: "no fault", faults: {}, acquire: "held", end: "clean" },
  { name: "reserve throws", faults: { reserve: ["throw"] }, acquire: "DatabaseError", end: "clean" },
  { name: "reserve arrives past its bound", faults: { reserve: ["late"] }, acquire: "PoolExhausted", waitsAt: "reserve:late", end: "clean" },
  { name: "first query throws unsent", faults: { firstQuery: ["throw"] }, acquire: "DatabaseError", end: "terminated" },
  { name: "lock answer lost", faults: { firstQuery: ["answerLost"] }, acquire: "DatabaseError", end: "terminated" },
  { name: "lock answer hangs", faults: { firstQuery: ["hang"] }, acquire: "DatabaseError", waitsAt: "firstQuery:hang", end: "terminated" },
  { name: "lock answer malformed", faults: { firstQuery: ["malformed"] }, acquire: "DatabaseError", end: "terminated" },
  { name: "first unlock throws", faults: { unlock: ["throw"] }, acquire: "held", end: "clean" },
  { name: "two unlocks throw", faults: { unlock: ["throw", "throw"] }, acquire: "held", end: "clean" },
  { name: "first unlock hangs", faults: { unlock: ["hang"] }, acquire: "held", end: "clean" },
  { name: "every unlock throws", faults: { unlock: ["throw", "throw", "throw"] }, acquire: "held", end: "terminated" },
  { name: "every unlock hangs", faults: { unlock: ["hang", "hang", "hang"] }, acquire: "held", end: "terminated" },
  { name: "unlock answers not held", faults: { unlock: ["false"] }, acquire: "held", end: "terminated" },
  {
    name: "unlocks fail and the terminate cannot connect",
    faults: { unlock: ["throw", "throw", "throw"] },
    terminatePath: "refuse",
    acquire: "held",
    end: "stranded"
  },
  {
    name: "unlocks fail and the terminate gets no answer",
    faults: { unlock: ["hang", "throw", "hang"] },
    terminatePath: "blackhole",
    acquire: "held",
    end: "stranded"
  },
  { name: "release throws", faults: { release: ["throwAfter"] }, acquire: "held", end: "release failed" },
  { name: "keepalive unanswered", faults: { keepalive: ["hang"] }, acquire: "held", loss: "keepalive", end: "terminated" },
  { name: "backend terminated while held", faults: {}, acquire: "held", loss: "backendTerminated", end: "clean" }
]

const endings = [
  "scopeCloses",
  "workFails",
  "interruptedWhileHeld",
  "scopeClosedByAnotherFiberWhileHeld",
  "interruptedWhileWaiting",
  "scopeClosedByAnotherFiberWhileWaiting",
  "busyRetriesInOneScope"
] as const
type Ending = (typeof endings)[number]

const applies = (scenario: Scenario, ending: Ending): boolean => {
  switch (ending) {
    case "interruptedWhileWaiting":
    case "scopeClosedByAnotherFiberWhileWaiting":
      return scenario.waitsAt !== undefined
    case "busyRetriesInOneScope":
      // Busy attempts never unlock, keep alive or release a held lock: only faults of the acquire apply.
      return scenario.acquire !== "held" || (Object.keys(scenario.faults).length === 0 && scenario.loss === undefined)
    default:
      return true
  }
}

interface Case {
  readonly scenario: Scenario
  readonly ending: Ending
  readonly attempts: number
  readonly holdMs: number
}

const cases: fc.Arbitrary<Case> = fc.record({
  scenario: fc.constantFrom(...scenarios),
  ending: fc.constantFrom(...endings),
  attempts: fc.integer({ min: 2, max: 4 }),
  holdMs: fc.integer({ min: 0, max: 10 })
}).filter((c) => applies(c.scenario, c.ending))

/** Generated cases per CI run. */
const numRuns = 300

const timings = { reserveTimeoutMs: 150, keepaliveMs: 100, releaseTimeoutMs: 100, lateMs: 250 } as const

class WorkFailed {
  readonly _tag = "WorkFailed"
}

layer(lockHarnessLayer({ poolMax: 4, cap: 3, ...timings }), { excludeTestServices: true })("ConversationLocks under placed faults", (it) => {
  it.effect(`${numRuns} cases: the fault fires, the release outcome is the expected one, nothing leaks`, () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      const context = yield* Effect.context<ConversationLocks | LockHarness | Database>()
      const run = Effect.runPromiseWith(context)
      harness.faults.lateMs = timings.lateMs

      const inject = (scenario: Scenario) => {
        for (const [point, queued] of Object.entries(scenario.faults)) {
          ;(harness.faults[point as keyof Queued] as Array<string>).push(...(queued as Array<string>))
        }
        if (scenario.terminatePath !== undefined) harness.terminatePath.mode = scenario.terminatePath
      }
      const fired = (marker: string) => eventually(`${marker} fired`, Effect.sync(() => harness.faults.fired.includes(marker)))

      /** Acquires in `scope`, then ends as the case says. */
      const holdAndEnd = (c: Case, scope: Scope.Closeable) =>
        Effect.gen(function*() {
          const lock = yield* locks.acquire(keys[0]!).pipe(Scope.provide(scope))
          if (c.scenario.loss === "backendTerminated") {
            yield* Effect.promise(() => harness.admin`select pg_terminate_backend(${lock.backendPid})`)
          }
          if (c.scenario.loss !== undefined) yield* lock.awaitLost.pipe(Effect.timeout(5_000))
          yield* Effect.sleep(c.holdMs)
          if (c.ending === "workFails") return yield* Effect.fail(new WorkFailed())
        })

      const playEnding = (c: Case) =>
        Effect.gen(function*() {
          const scope = yield* Scope.make()
          switch (c.ending) {
            case "scopeCloses":
            case "workFails": {
              const exit = yield* Effect.exit(holdAndEnd(c, scope))
              yield* Scope.close(scope, exit)
              return exit
            }
            case "interruptedWhileHeld":
            case "scopeClosedByAnotherFiberWhileHeld": {
              const held = yield* Deferred.make<void>()
              const fiber = yield* Effect.forkChild(
                holdAndEnd(c, scope).pipe(Effect.andThen(Deferred.succeed(held, undefined)), Effect.andThen(Effect.never))
              )
              yield* Effect.raceFirst(Deferred.await(held), Effect.asVoid(Fiber.await(fiber)))
              // Either the holder is interrupted (its scope then closes), or its scope is closed under it.
              if (c.ending === "interruptedWhileHeld") yield* Fiber.interrupt(fiber)
              yield* Scope.close(scope, Exit.void)
              yield* Fiber.interrupt(fiber)
              return yield* Fiber.await(fiber)
            }
            case "interruptedWhileWaiting":
            case "scopeClosedByAnotherFiberWhileWaiting": {
              const fiber = yield* Effect.forkChild(locks.acquire(keys[0]!).pipe(Scope.provide(scope)))
              yield* fired(c.scenario.waitsAt!)
              if (c.ending === "interruptedWhileWaiting") yield* Fiber.interrupt(fiber)
              yield* Scope.close(scope, Exit.void)
              const exit = yield* Fiber.await(fiber)
              assert.isTrue(Exit.isFailure(exit) && exit.cause.reasons.some((r) => r._tag === "Interrupt"), "ended as interrupted")
              return exit
            }
            case "busyRetriesInOneScope": {
              const competitor = yield* Scope.make()
              harness.clearFaults()
              yield* locks.acquire(keys[0]!).pipe(Scope.provide(competitor))
              inject(c.scenario)
              yield* Effect.gen(function*() {
                for (let attempt = 0; attempt < c.attempts; attempt++) {
                  const error = yield* Effect.flip(locks.acquire(keys[0]!).pipe(Scope.provide(scope)))
                  const expected = attempt === 0 && c.scenario.acquire !== "held" ? c.scenario.acquire : "ConversationBusy"
                  assert.strictEqual(error._tag, expected, `attempt ${attempt}`)
                  const usage = yield* locks.localUsage
                  assert.strictEqual(usage.held, 1, "only the competitor holds")
                  assert.strictEqual(usage.inFlight, 0, "nothing in flight between attempts")
                }
                // The same long-lived scope still gets another conversation.
                yield* locks.acquire(keys[1]!).pipe(Scope.provide(scope))
              })
              yield* Scope.close(scope, Exit.void)
              yield* Scope.close(competitor, Exit.void)
              return Exit.void
            }
          }
        })

      const check = (c: Case, exit: Exit.Exit<unknown, unknown>, logsBefore: number) =>
        Effect.gen(function*() {
          const label = `${c.scenario.name} / ${c.ending}`
          const queued = Object.values(c.scenario.faults).reduce((n, q) => n + q.length, 0)
          if (c.ending !== "busyRetriesInOneScope" || c.scenario.acquire !== "held") {
            assert.strictEqual(harness.faults.fired.length, queued, `${label}: every fault fired (${harness.faults.fired})`)
          }
          if (c.ending === "scopeCloses" && c.scenario.acquire !== "held") {
            assert.isTrue(Exit.isFailure(exit) && exit.cause.reasons.some((r) => r._tag === "Fail" && (r.error as { _tag: string })._tag === c.scenario.acquire), `${label}: acquire failed with ${c.scenario.acquire}`)
          }
          if (c.scenario.terminatePath !== undefined) {
            yield* eventually(`${label}: stranded`, Effect.map(locks.localUsage, (u) => u.stranded === 1))
            harness.terminatePath.mode = "pass"
          }
          yield* expectQuiescent
          const logs = harness.logs.slice(logsBefore).filter((line) => line.level === "Warn" || line.level === "Error")
          const errors = logs.filter((line) => line.level === "Error")
          const expectedEnd = c.ending === "busyRetriesInOneScope" && c.scenario.acquire === "held" ? "clean" : c.scenario.end
          if (expectedEnd === "clean") {
            assert.deepStrictEqual(errors.map((line) => line.message), [], `${label}: no error logged`)
          } else {
            assert.strictEqual(errors.length, 1, `${label}: one error logged, got ${JSON.stringify(errors)}`)
            assert.strictEqual(errors[0]!.annotations["connection"], expectedEnd, `${label}: release outcome`)
          }
          const warnings = logs.filter((line) => line.level === "Warn").map((line) => line.message)
          assert.deepStrictEqual(warnings, c.scenario.loss === undefined ? [] : ["Conversation lock lost"], `${label}: warnings`)
        })

      let played = 0
      yield* Effect.promise(() =>
        fc.assert(
          fc.asyncProperty(cases, async (c) => {
            harness.clearFaults()
            harness.terminatePath.mode = "pass"
            const logsBefore = harness.logs.length
            if (c.ending !== "busyRetriesInOneScope") inject(c.scenario)
            const exit = await run(playEnding(c))
            await run(check(c, exit, logsBefore))
            played++
          }),
          { numRuns }
        )
      )
      assert.strictEqual(played, numRuns)
    }), { timeout: 900_000 })
})
