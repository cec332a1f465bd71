/**
 * The work loop with conversation locks: one run of a conversation in flight at a time, in enqueue
 * order, under a lock kept across the conversation's consecutive runs and let go after the idle period;
 * busy conversations deferred without spending an attempt; a lock lost mid-run releases the run.
 */
import { assert, layer } from "@effect/vitest"
import { ConfigProvider, Context, Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { conversationLockHash, defaultLockNamespace } from "../../src/locks/lockKey.ts"
import { type RunHandlerInput, RunWorker } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { advisoryLocksInNamespace, eventually, LockHarness, lockHarnessLayer } from "../support/lockHarness.ts"
import { freshQueue, readRun, runInput, startWorker } from "../support/runsHarness.ts"

const idleMs = 400

const TestLayer = RunWorker.layer.pipe(
  Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 3_000, heartbeatMs: 1_000 })),
  Layer.provideMerge(lockHarnessLayer({ poolMax: 10, cap: 4, keepaliveMs: 1_000 })),
  Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_CONVERSATION_IDLE_MS: String(idleMs) })))
)


const conversation = (n: number) => ({ agentId: "agent", conversationId: `conversation-${n}` })

layer(TestLayer, { excludeTestServices: true })("RunWorker with conversation locks", (it) => {
  it.effect("one run of a conversation at a time, in enqueue order, on one lock kept across its runs, let go when idle", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("conversations")
      const sent = yield* queue.sendMany(Array.from({ length: 24 }, (_, i) => runInput(q, { ...conversation(i % 3), payload: { i } })))
      const inFlight = new Map<string, number>()
      const seen = new Map<string, Array<{ id: number; pid: number }>>()
      let overlaps = 0
      const handler = ({ run, lock }: RunHandlerInput) =>
        Effect.gen(function*() {
          const key = run.conversationId!
          inFlight.set(key, (inFlight.get(key) ?? 0) + 1)
          if (inFlight.get(key)! > 1) overlaps++
          assert.isDefined(lock)
          seen.set(key, [...(seen.get(key) ?? []), { id: run.id, pid: lock!.backendPid }])
          yield* Effect.sleep(5)
          inFlight.set(key, inFlight.get(key)! - 1)
        })
      const worker = yield* startWorker({ queue: q, handler, concurrency: 6, pollIntervalMs: 50 })
      yield* eventually("every run completed", Effect.map(
        Effect.forEach(sent, (s) => readRun(s.id)),
        (rows) => rows.every((row) => row.status === "completed")
      ), 30_000)
      assert.strictEqual(overlaps, 0, "two runs of one conversation ran at once")
      for (const [key, runs] of seen) {
        const ids = runs.map((r) => r.id)
        assert.deepStrictEqual(ids, [...ids].sort((a, b) => a - b), `${key} ran in enqueue order`)
        // Kept across its consecutive runs: at most a few lock sessions for eight runs (re-taken only after an idle gap).
        assert.isAtMost(new Set(runs.map((r) => r.pid)).size, 3, `${key} kept its lock`)
      }
      const ids = sent.map((s) => s.id)
      const rows = yield* Effect.forEach(ids, readRun)
      assert.isTrue(rows.every((row) => row.attempts === 0))
      yield* eventually("conversations let go after the idle period", Effect.map(advisoryLocksInNamespace, (n) => n === 0), 5_000)
      yield* worker.stop
    }))

  it.effect("a conversation's next run starts as soon as its previous run is completed, not at the next poll", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("conversation-next")
      // The statement that completes a conversation's run cannot claim its next run (it still sees the
      // completed one claimed): the worker must claim again at once, with no NOTIFY to wake it.
      const sent = yield* queue.sendMany(Array.from({ length: 5 }, (_, i) => runInput(q, { ...conversation(9), payload: { i } })))
      const worker = yield* startWorker({ queue: q, handler: () => Effect.void, pollIntervalMs: 600_000 })
      yield* eventually(
        "every run completed well within one poll interval",
        Effect.map(Effect.forEach(sent, (run) => readRun(run.id)), (rows) => rows.every((row) => row.status === "completed")),
        10_000
      )
      yield* worker.stop
    }))

  it.effect("a conversation held elsewhere defers its run without spending an attempt; it runs once free", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const harness = yield* LockHarness
      const q = freshQueue("busy")
      const key = { organizationId: "org-1", ...conversation(9) }
      const outside = postgres(harness.url, { max: 1, onnotice: () => {} })
      const reserved = yield* Effect.promise(() => outside.reserve())
      yield* Effect.promise(() => reserved`select pg_advisory_lock(${defaultLockNamespace}::int4, ${conversationLockHash(key)}::int4)`)
      const { id } = yield* queue.send(runInput(q, conversation(9)))
      let handled = 0
      const worker = yield* startWorker({ queue: q, handler: () => Effect.sync(() => void handled++), pollIntervalMs: 50 })
      yield* eventually("the run deferred", Effect.map(readRun(id), (row) => row.status === "pending" && row.run_at.getTime() > Date.now()), 10_000)
      assert.strictEqual((yield* readRun(id)).attempts, 0)
      assert.strictEqual(handled, 0)
      yield* Effect.promise(async () => {
        await reserved`select pg_advisory_unlock_all()`
        reserved.release()
        await outside.end({ timeout: 5 })
      })
      yield* eventually("the run completed", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      assert.strictEqual((yield* readRun(id)).attempts, 0)
      assert.strictEqual(handled, 1)
      yield* worker.stop
    }))

  it.effect("a lock lost mid-run (backend terminated) interrupts the handler and releases the run; it completes once later", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const harness = yield* LockHarness
      const q = freshQueue("lost")
      const { id } = yield* queue.send(runInput(q, conversation(7)))
      let calls = 0
      let completions = 0
      const handler = ({ lock }: RunHandlerInput) =>
        Effect.gen(function*() {
          calls++
          if (calls === 1) {
            yield* Effect.promise(() => harness.admin`select pg_terminate_backend(${lock!.backendPid})`)
            return yield* Effect.never
          }
          completions++
        })
      const worker = yield* startWorker({ queue: q, handler, pollIntervalMs: 50 })
      yield* eventually("the run completed", Effect.map(readRun(id), (row) => row.status === "completed"), 15_000)
      assert.strictEqual(calls, 2)
      assert.strictEqual(completions, 1)
      assert.strictEqual((yield* readRun(id)).attempts, 0, "a release spends no attempt")
      yield* worker.stop
    }))

  it.effect("stopping while busy leaves nothing claimed by the stopped worker and no lock held", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("stop")
      yield* queue.sendMany([0, 1, 2].map((n) => runInput(q, conversation(20 + n))))
      let started = 0
      const worker = yield* startWorker({ queue: q, handler: () => Effect.sync(() => void started++).pipe(Effect.andThen(Effect.never)), pollIntervalMs: 50, stopTimeoutMs: 100 })
      yield* eventually("three handlers running", Effect.sync(() => started === 3), 10_000)
      yield* worker.stop
      const { use } = yield* Database
      const [row] = yield* use("test.claimed", (sql) =>
        sql<Array<{ n: number }>>`select count(*)::int as n from runs where queue = ${q} and status = 'claimed'`)
      assert.strictEqual(row!.n, 0)
      yield* eventually("no lock held", Effect.map(advisoryLocksInNamespace, (n) => n === 0), 5_000)
      const locks = yield* ConversationLocks
      const usage = yield* locks.localUsage
      assert.deepStrictEqual([usage.held, usage.inFlight, usage.stranded], [0, 0, 0])
    }))
})

/** Conversations kept idle for a minute, at most two locks: the cap, not the idle period, decides. */
const KeepingLayer = RunWorker.layer.pipe(
  Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 3_000, heartbeatMs: 1_000 })),
  Layer.provideMerge(lockHarnessLayer({ poolMax: 10, cap: 2, keepaliveMs: 1_000 })),
  Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_CONVERSATION_IDLE_MS: "60000" })))
)

layer(KeepingLayer, { excludeTestServices: true })("RunWorker keeping conversations at the lock cap", (it) => {
  it.effect("a new conversation at the cap takes the place of the one idle longest instead of being deferred", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const worker = yield* RunWorker
      const q = freshQueue("evict")
      // Six conversations, one run each: with two seats kept for a minute, runs 3-6 meet the cap.
      const locks = yield* ConversationLocks
      const refusedBefore = (yield* locks.localUsage).capReached
      const sent = yield* queue.sendMany(Array.from({ length: 6 }, (_, i) => runInput(q, conversation(40 + i))))
      const running = yield* startWorker({ queue: q, handler: () => Effect.void, concurrency: 1, pollIntervalMs: 50 })
      yield* eventually("every run completed", Effect.map(
        Effect.forEach(sent, (s) => readRun(s.id)),
        (rows) => rows.every((row) => row.status === "completed")
      ), 30_000)
      const { use } = yield* Database
      // A deferral moves run_at past created_at; none may have happened.
      const [deferred] = yield* use("test.deferred", (sql) =>
        sql<Array<{ n: number }>>`select count(*)::int as n from runs where queue = ${q} and run_at > created_at`)
      assert.strictEqual(deferred!.n, 0, "a run was deferred at the cap although an idle conversation could make room")
      assert.strictEqual((yield* locks.localUsage).capReached - refusedBefore, 0, "room was made before acquiring, not after a refusal")
      assert.strictEqual(yield* worker.conversationsServed, 2, "the last two conversations are kept")
      assert.strictEqual(yield* advisoryLocksInNamespace, 2)
      yield* running.stop
      yield* eventually("stopping lets the kept conversations go", Effect.map(advisoryLocksInNamespace, (n) => n === 0), 5_000)
      assert.strictEqual(yield* worker.conversationsServed, 0)
    }))
})

layer(KeepingLayer, { excludeTestServices: true })("RunWorker handing a kept conversation to another process", (it) => {
  it.effect("a kept conversation whose session dies is let go at once, not at the end of its idle period", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const harness = yield* LockHarness
      const worker = yield* RunWorker
      const q = freshQueue("kept-dies")
      const { id } = yield* queue.send(runInput(q, conversation(70)))
      let pid = 0
      const running = yield* startWorker({ queue: q, handler: ({ lock }: RunHandlerInput) => Effect.sync(() => void (pid = lock!.backendPid)), pollIntervalMs: 50 })
      yield* eventually("the run completed", Effect.map(readRun(id), (row) => row.status === "completed"), 10_000)
      assert.strictEqual(yield* worker.conversationsServed, 1)
      yield* Effect.promise(() => harness.admin`select pg_terminate_backend(${pid})`)
      yield* eventually("the dead seat let go", Effect.map(worker.conversationsServed, (n) => n === 0), 5_000)
      yield* running.stop
    }))

  it.effect("a conversation kept idle here is let go when another process's worker is refused it as busy", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const harness = yield* LockHarness
      const here = freshQueue("kept-here")
      const there = freshQueue("wanted-there")
      const { id: first } = yield* queue.send(runInput(here, conversation(60)))
      const keeping = yield* startWorker({ queue: here, handler: () => Effect.void, pollIntervalMs: 50 })
      yield* eventually("the first run completed", Effect.map(readRun(first), (row) => row.status === "completed"), 10_000)
      assert.strictEqual(yield* (yield* RunWorker).conversationsServed, 1, "kept for a minute after its run")

      // A second stack on the same database: another pool, other sessions, its own seats, as another process.
      // Layer.fresh: the test's layer already built RunWorker.layer, and building it again would share it.
      const other = yield* Layer.build(Layer.fresh(RunWorker.layer).pipe(
        Layer.provideMerge(RunsQueue.layerWith({ leaseMs: 3_000, heartbeatMs: 1_000 })),
        Layer.provideMerge(ConversationLocks.layerWith({ cap: 2, keepaliveMs: 1_000 })),
        Layer.provideMerge(Database.layerWith({ url: Redacted.make(harness.url), poolMax: 5 })),
        Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_CONVERSATION_IDLE_MS: "60000" })))
      ))
      const { id: second } = yield* Context.get(other, RunsQueue).send(runInput(there, conversation(60)))
      const handledThere = yield* Effect.sync(() => ({ n: 0 }))
      yield* Context.get(other, RunWorker).start({ queue: there, handler: () => Effect.sync(() => void handledThere.n++), pollIntervalMs: 50 })
      // Refused once as busy (deferred by 1 s), then free: well within the minute the conversation was kept for.
      yield* eventually("the other process ran the conversation's next run", Effect.map(readRun(second), (row) => row.status === "completed"), 10_000)
      assert.strictEqual(handledThere.n, 1)
      assert.strictEqual(yield* (yield* RunWorker).conversationsServed, 0, "let go here")
      yield* keeping.stop
    }))
})
