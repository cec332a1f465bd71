/**
 * Conversations kept by the workers of one process are shared by all of them. One worker stopping lets
 * go of the idle ones, one unlock at a time; a seat another worker takes meanwhile must not be let go
 * under its running handler (found by review: the lock was released while the handler ran).
 */
import { assert, layer } from "@effect/vitest"
import { ConfigProvider, Deferred, Effect, Fiber, Layer } from "effect"
import { conversationLockHash } from "../../src/locks/lockKey.ts"
import { type RunHandlerInput, RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { eventually, holdersOf, LockHarness, lockHarnessLayer } from "../support/lockHarness.ts"
import { freshQueue, readRun, runInput, startWorker } from "../support/runsHarness.ts"

const TestLayer = RunWorker.layer.pipe(
  Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 10_000, heartbeatMs: 1_000 })),
  Layer.provideMerge(lockHarnessLayer({ poolMax: 12, cap: 6, keepaliveMs: 1_000 })),
  Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_CONVERSATION_IDLE_MS: "60000" })))
)

const conversation = (n: number) => ({ agentId: "agent", conversationId: `c-${n}` })

layer(TestLayer, { excludeTestServices: true })("conversations shared by the workers of a process", (it) => {
  it.effect("a worker stopping does not let go of a kept conversation another worker took meanwhile", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const harness = yield* LockHarness
      const qa = freshQueue("a")
      const qb = freshQueue("b")

      // Worker A keeps two conversations idle, c-1 then c-2 (the order they are let go in).
      const a1 = yield* queue.send(runInput(qa, conversation(1)))
      const workerA = yield* startWorker({ queue: qa, handler: () => Effect.void, pollIntervalMs: 50 })
      yield* eventually("c-1's run", Effect.map(readRun(a1.id), (row) => row.status === "completed"), 10_000)
      const a2 = yield* queue.send(runInput(qa, conversation(2)))
      yield* eventually("c-2's run", Effect.map(readRun(a2.id), (row) => row.status === "completed"), 10_000)
      assert.strictEqual(yield* (yield* RunWorker).conversationsServed, 2)

      const release = yield* Deferred.make<void>()
      let bPid = 0
      const workerB = yield* startWorker({
        queue: qb,
        pollIntervalMs: 50,
        handler: ({ lock }: RunHandlerInput) => Effect.sync(() => void (bPid = lock!.backendPid)).pipe(Effect.andThen(Deferred.await(release)))
      })
      // c-1's unlock hangs (bounded by the release timeout): A's letting go is slow, c-2 still waits its turn.
      harness.faults.unlock.push("hang")
      const stopping = yield* Effect.forkChild(workerA.stop)
      yield* eventually("A is letting c-1 go", Effect.sync(() => harness.faults.fired.includes("unlock:hang")), 5_000)
      // Meanwhile worker B takes the kept c-2.
      const b = yield* queue.send(runInput(qb, conversation(2)))
      yield* eventually("B's handler started", Effect.sync(() => bPid !== 0), 5_000)
      yield* Fiber.join(stopping)

      // B's handler still runs: it must still hold c-2's lock, and c-2 must still count as served.
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash({ organizationId: "org-1", ...conversation(2) })), [bPid])
      assert.strictEqual(yield* (yield* RunWorker).conversationsServed, 1)
      yield* Deferred.succeed(release, undefined)
      yield* eventually("B's run completed", Effect.map(readRun(b.id), (row) => row.status === "completed"), 10_000)
      yield* workerB.stop
    }))
})
