import { assert, layer } from "@effect/vitest"
import { Effect, Fiber, Layer, Option } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { maxSnapshotBytes, TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { defaultUploadGroupLimits } from "../../src/snapshots/uploadGroups.ts"
import { eventually } from "../support/lockHarness.ts"
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

  it.effect("putIfRunInScope: an upload given up while it waits for a statement is never stored", () =>
    Effect.gen(function*() {
      const snapshots = yield* TranscriptSnapshots
      const database = yield* Database
      const scope = { ...conversation, conversationId: "c-given-up" }
      const bound = defaultUploadGroupLimits.maxStatementsInFlight
      const runIds: Array<number> = []
      for (let i = 0; i <= bound; i++) runIds.push(yield* newRun(scope))
      const upload = (runId: number) =>
        snapshots.putIfRunInScope(scope, { runId, terminalStatus: "completed", snapshotJsonl: jsonl({ runId }) })
      const waitingUploads = database.use("test", (sql) =>
        sql<Array<{ count: number }>>`
          select count(*)::int as count from pg_stat_activity
           where datname = current_database() and wait_event_type = 'Lock'
             and query like 'insert into agent_transcript_snapshots%'`).pipe(Effect.map((rows) => rows[0]!.count))

      const blocker = yield* Effect.acquireRelease(
        Effect.promise(() => database.sql.reserve()),
        (connection) => Effect.sync(() => connection.release())
      )
      yield* Effect.promise(async () => {
        await blocker`begin`
        await blocker`lock table agent_transcript_snapshots in exclusive mode`
      })
      // Fill the in-flight bound with statements held by the lock, one at a time.
      const held: Array<Fiber.Fiber<unknown, unknown>> = []
      for (const [index, runId] of runIds.slice(0, bound).entries()) {
        held.push(yield* Effect.forkChild(upload(runId)))
        yield* eventually(
          `upload statement ${index + 1} waits on the lock`,
          Effect.map(waitingUploads, (count) => count >= index + 1)
        )
      }
      const givenUp = yield* Effect.forkChild(upload(runIds[bound]!))
      yield* Effect.yieldNow
      yield* Fiber.interrupt(givenUp)
      yield* Effect.promise(async () => {
        await blocker`commit`
      })
      for (const fiber of held) assert.isTrue(Option.isSome((yield* Fiber.join(fiber)) as Option.Option<unknown>))
      const stored = yield* database.use("test", (sql) =>
        sql<Array<{ run_id: string }>>`
          select run_id::text from agent_transcript_snapshots where run_id in ${sql(runIds)} order by run_id`)
      assert.deepStrictEqual(stored.map((row) => Number(row.run_id)), runIds.slice(0, bound))
    }))
})
