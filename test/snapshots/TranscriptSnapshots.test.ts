import { assert, layer } from "@effect/vitest"
import { Effect, Layer, Option } from "effect"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { maxSnapshotBytes, TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = Layer.mergeAll(TranscriptSnapshots.layer, RunsQueue.layer).pipe(Layer.provideMerge(testDatabaseLayer()))

const conversation = { organizationId: "org-a", agentId: "agent-x", conversationId: "telegram:6570514069" }

const newRun = (scope = conversation) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    return (yield* queue.send({ queue: "messages", ...scope, payload: {} })).id
  })

const jsonl = (...lines: ReadonlyArray<unknown>) => lines.map((line) => JSON.stringify(line)).join("\n") + "\n"

layer(TestLayer, { excludeTestServices: true })("TranscriptSnapshots", (it) => {
  it.effect("latest returns the newest completed snapshot byte for byte, never a failed newer one", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const scope = { ...conversation, conversationId: "c-latest" }
      assert.isTrue(Option.isNone(yield* snapshots.latest(scope)))
      const first = jsonl({ type: "session" }, { type: "message", text: "héllo 日本 🙂" })
      yield* snapshots.put(scope, { runId: yield* newRun(scope), terminalStatus: "completed", snapshotJsonl: first })
      const second = jsonl({ type: "session" }, { type: "message", text: "second" })
      yield* snapshots.put(scope, { runId: yield* newRun(scope), terminalStatus: "completed", snapshotJsonl: second })
      yield* snapshots.put(scope, { runId: yield* newRun(scope), terminalStatus: "failed", snapshotJsonl: jsonl({ type: "tool_use" }) })
      assert.strictEqual(Option.getOrThrow(yield* snapshots.latest(scope)), second)
    }))

  it.effect("a 600 KB snapshot with multi-byte characters round-trips exactly", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const scope = { ...conversation, conversationId: "c-large" }
      const big = jsonl({ type: "message", text: "ü🙂x".repeat(100_000) })
      assert.isAbove(Buffer.byteLength(big), 600_000)
      yield* snapshots.put(scope, { runId: yield* newRun(scope), terminalStatus: "completed", snapshotJsonl: big })
      assert.strictEqual(Option.getOrThrow(yield* snapshots.latest(scope)), big)
    }))

  it.effect("first writer wins: a second put for the run is SnapshotExists, even when concurrent", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const scope = { ...conversation, conversationId: "c-race" }
      const runId = yield* newRun(scope)
      const results = yield* Effect.all(
        ["first", "second"].map((text) =>
          Effect.result(snapshots.put(scope, { runId, terminalStatus: "completed", snapshotJsonl: jsonl({ text }) }))),
        { concurrency: "unbounded" }
      )
      assert.strictEqual(results.filter((r) => r._tag === "Success").length, 1)
      const failure = results.find((r) => r._tag === "Failure")
      assert.strictEqual(failure?._tag === "Failure" ? failure.failure._tag : undefined, "SnapshotExists")
      const again = yield* Effect.flip(snapshots.put(scope, { runId, terminalStatus: "completed", snapshotJsonl: "x\n" }))
      assert.strictEqual(again._tag, "SnapshotExists")
    }))

  it.effect("reset deletes one conversation's snapshots, answers how many, and is idempotent", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const scope = { ...conversation, conversationId: "c-reset" }
      const sibling = { ...conversation, conversationId: "c-reset-sibling" }
      for (let i = 0; i < 3; i++) {
        yield* snapshots.put(scope, { runId: yield* newRun(scope), terminalStatus: "completed", snapshotJsonl: jsonl({ i }) })
      }
      yield* snapshots.put(sibling, { runId: yield* newRun(sibling), terminalStatus: "completed", snapshotJsonl: jsonl("s") })
      assert.deepStrictEqual(yield* snapshots.reset(scope), { deleted: 3 })
      assert.deepStrictEqual(yield* snapshots.reset(scope), { deleted: 0 })
      assert.isTrue(Option.isNone(yield* snapshots.latest(scope)))
      assert.isTrue(Option.isSome(yield* snapshots.latest(sibling)))
    }))

  it.effect("tenants never see each other's snapshots, even with the same agent and conversation ids", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const a = { ...conversation, conversationId: "c-tenant" }
      const b = { ...a, organizationId: "org-b" }
      yield* snapshots.put(a, { runId: yield* newRun(a), terminalStatus: "completed", snapshotJsonl: jsonl("a") })
      assert.isTrue(Option.isNone(yield* snapshots.latest(b)))
      assert.deepStrictEqual(yield* snapshots.reset(b), { deleted: 0 })
      assert.strictEqual(Option.getOrThrow(yield* snapshots.latest(a)), jsonl("a"))
    }))

  it.effect("refuses bad input by name, and stores nothing", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const scope = { ...conversation, conversationId: "c-bad" }
      const runId = yield* newRun(scope)
      const tooLarge = yield* Effect.flip(snapshots.put(scope, { runId, terminalStatus: "completed", snapshotJsonl: "x".repeat(maxSnapshotBytes + 1) }))
      assert.deepInclude(tooLarge, { _tag: "SnapshotTooLarge", bytes: maxSnapshotBytes + 1, limit: maxSnapshotBytes })
      for (const [input, field] of [
        [{ runId, terminalStatus: "nope", snapshotJsonl: "x" }, "terminalStatus"],
        [{ runId, terminalStatus: "completed", snapshotJsonl: "" }, "snapshotJsonl"],
        [{ runId, terminalStatus: "completed", snapshotJsonl: "a\u0000b" }, "snapshotJsonl"],
        [{ runId: 0, terminalStatus: "completed", snapshotJsonl: "x" }, "runId"],
        [{ runId: -3, terminalStatus: "completed", snapshotJsonl: "x" }, "runId"],
        [{ runId: 1.5, terminalStatus: "completed", snapshotJsonl: "x" }, "runId"],
        [{ runId: runId + 1_000_000, terminalStatus: "completed", snapshotJsonl: "x" }, "runId"]
      ] as const) {
        const error = yield* Effect.flip(snapshots.put(scope, input as never))
        assert.deepInclude(error, { _tag: "InvalidSnapshot", field }, JSON.stringify(input).slice(0, 80))
      }
      assert.isTrue(Option.isNone(yield* snapshots.latest(scope)))
      assert.deepStrictEqual(yield* snapshots.reset(scope), { deleted: 0 })
    }))
})
