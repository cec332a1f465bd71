/**
 * A claim statement that committed but whose answer never arrived (the connection failed after the
 * commit): the runs it claimed are handed back at once, without spending an attempt, rather than left
 * claimed until the sweep counts an attempt for work that never started.
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { Database } from "../../src/db/Database.ts"
import { DatabaseError } from "../../src/db/DatabaseError.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { freshQueue, movableClock, readRun, runInput } from "../support/runsHarness.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

/** Operations whose next statement commits and then fails as a lost connection would. */
const answerLost = new Set<string>()

const LosingAnswers = Layer.effect(
  Database,
  Effect.map(Database, (real) =>
    Database.of({
      ...real,
      use: (operation, f) =>
        Effect.andThen(real.use(operation, f), (answer) => {
          if (!answerLost.delete(operation)) return Effect.succeed(answer)
          return Effect.fail(new DatabaseError({ operation, message: "injected: connection reset after commit", retryable: true, cause: null }))
        })
    }))
)

const clock = movableClock()
const TestLayer = RunsQueue.layerWith({ now: clock.now }).pipe(Layer.provide(LosingAnswers), Layer.provideMerge(testDatabaseLayer()))

layer(TestLayer, { excludeTestServices: true })("RunsQueue, a claim whose answer was lost", (it) => {
  it.effect("claim: the runs it took are pending again with no attempt spent, and claimed by the next claim", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("claim-lost")
      const sent = yield* queue.sendMany([runInput(q), runInput(q)])
      answerLost.add("RunsQueue.claim")
      const error = yield* Effect.flip(queue.claim(q, { limit: 2 }))
      assert.strictEqual(error._tag, "DatabaseError")
      for (const { id } of sent) {
        const row = yield* readRun(id)
        assert.deepStrictEqual({ status: row.status, attempts: row.attempts, claimedBy: row.claimed_by }, { status: "pending", attempts: 0, claimedBy: null })
      }
      const again = yield* queue.claim(q, { limit: 2 })
      assert.deepStrictEqual(again.map((run) => run.id).sort(), sent.map((run) => run.id).sort())
    }))

  it.effect("completeManyAndClaim: its completions stand, the runs it claimed are pending again", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("complete-and-claim-lost")
      const { id: finishedId } = yield* queue.send(runInput(q))
      const [finished] = yield* queue.claim(q, { limit: 1 })
      const sent = yield* queue.sendMany([runInput(q), runInput(q)])
      answerLost.add("RunsQueue.completeManyAndClaim")
      yield* Effect.flip(queue.completeManyAndClaim([finished!], q, { limit: 2 }))
      assert.strictEqual((yield* readRun(finishedId)).status, "completed")
      for (const { id } of sent) {
        const row = yield* readRun(id)
        assert.deepStrictEqual({ status: row.status, attempts: row.attempts }, { status: "pending", attempts: 0 })
      }
    }))
})
