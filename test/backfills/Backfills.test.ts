import { assert, describe, it, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { BackfillArgumentError, parseBackfillArguments } from "../../src/backfills/backfillArguments.ts"
import { Backfills } from "../../src/backfills/Backfills.ts"
import { progressLine } from "../../src/terminal/progressLine.ts"
import { Database } from "../../src/db/Database.ts"
import { RunOwnership } from "../../src/ownership/RunOwnership.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = Layer.mergeAll(Backfills.layer, RunOwnership.layer, RunsQueue.layer).pipe(
  Layer.provideMerge(testDatabaseLayer())
)

/** A row as an older writer wrote it: marked legacy by the column default. */
const insertLegacy = (actionInput: string, columns: { agentId?: string } = {}) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const [row] = yield* use("test.insertLegacy", (sql) =>
      sql<Array<{ id: string }>>`
        insert into runs (organization_id, agent_id, queue, action_input)
        values ('org', ${columns.agentId ?? null}, 'messages', ${actionInput}::text::jsonb)
        returning id::text`)
    return Number(row!.id)
  })

interface StoredRow {
  readonly agent_id: string | null
  readonly conversation_id: string | null
  readonly legacy_scope: boolean
}

const readRow = (id: number) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const [row] = yield* use("test.readRow", (sql) =>
      sql<Array<StoredRow>>`select agent_id, conversation_id, legacy_scope from runs where id = ${id}`)
    return row!
  })

layer(TestLayer, { excludeTestServices: true })("the runs_legacy_scope backfill", (it) => {
  it.effect("fills both columns from a usable payload, leaves every unusable one untouched and counted", () =>
    Effect.gen(function*() {
      const backfills = yield* Backfills
      const ownership = yield* RunOwnership
      const { use } = yield* Database
      assert.deepStrictEqual(yield* backfills.unfinished, [])
      // runlane's table refuses a non-object action_input; an adopted older table may hold JSON strings.
      yield* use("test", (sql) => sql`alter table runs drop constraint runs_action_input_object_check`)
      const good = yield* insertLegacy(JSON.stringify({ agentId: "a", conversationId: "c", text: "hi" }))
      const inString = yield* insertLegacy(JSON.stringify(JSON.stringify({ agentId: "a", conversationId: "c-str" })))
      const agentInColumn = yield* insertLegacy(JSON.stringify({ conversationId: "c-col" }), { agentId: "a" })
      const unusable = [
        yield* insertLegacy(JSON.stringify({ agentId: null, conversationId: null })),
        yield* insertLegacy(JSON.stringify({ agentId: "a", conversationId: null })),
        yield* insertLegacy(JSON.stringify({ agentId: "a" })),
        yield* insertLegacy(JSON.stringify({})),
        yield* insertLegacy(JSON.stringify({ agentId: 7, conversationId: ["c"] })),
        yield* insertLegacy(JSON.stringify({ agentId: "", conversationId: "c" })),
        yield* insertLegacy(JSON.stringify("not json {")),
        yield* insertLegacy(JSON.stringify(JSON.stringify([1, 2])))
      ]
      yield* use("test", (sql) =>
        sql`alter table runs add constraint runs_action_input_object_check check (jsonb_typeof(action_input) = 'object') not valid`)
      const sent = yield* (yield* RunsQueue).send({
        queue: "messages",
        organizationId: "org",
        agentId: "a",
        payload: { conversationId: "c" }
      })
      assert.isTrue(yield* ownership.verify(good, { organizationId: "org", agentId: "a", conversationId: "c" }))
      assert.deepStrictEqual(yield* backfills.unfinished, ["runs_legacy_scope"])

      const report = yield* backfills.run("runs_legacy_scope", { batchSize: 3, rowsPerSecond: 0 })
      assert.deepStrictEqual(
        { done: report.done, changed: report.changed, skipped: report.skipped, finished: report.finished },
        { done: 11, changed: 3, skipped: 8, finished: true }
      )
      assert.deepStrictEqual(yield* readRow(good), { agent_id: "a", conversation_id: "c", legacy_scope: false })
      assert.deepStrictEqual(yield* readRow(inString), { agent_id: "a", conversation_id: "c-str", legacy_scope: false })
      const [unwrapped] = yield* use("test", (sql) =>
        sql<Array<{ kind: string }>>`select jsonb_typeof(action_input) as kind from runs where id = ${inString}`)
      assert.strictEqual(unwrapped!.kind, "object")
      assert.deepStrictEqual(yield* readRow(agentInColumn), { agent_id: "a", conversation_id: "c-col", legacy_scope: false })
      for (const id of unusable) {
        const row = yield* readRow(id)
        assert.isTrue(row.legacy_scope, `row ${id}`)
        assert.isNull(row.conversation_id, `row ${id}`)
      }
      assert.deepStrictEqual(yield* readRow(sent.id), { agent_id: "a", conversation_id: null, legacy_scope: false })
      // Same answers as before the backfill: a row's scope does not change by being backfilled.
      assert.isTrue(yield* ownership.verify(good, { organizationId: "org", agentId: "a", conversationId: "c" }))
      assert.isTrue(yield* ownership.verify(inString, { organizationId: "org", agentId: "a", conversationId: "c-str" }))
      assert.deepStrictEqual(yield* backfills.unfinished, [])
      const [checkpoint] = yield* use("test", (sql) =>
        sql<Array<{ rows_done: string; rows_changed: string; rows_skipped: string }>>`
          select rows_done::text, rows_changed::text, rows_skipped::text from runlane_backfills where name = 'runs_legacy_scope'`)
      assert.deepStrictEqual(checkpoint, { rows_done: "11", rows_changed: "3", rows_skipped: "8" })
      const again = yield* backfills.run("runs_legacy_scope", { rowsPerSecond: 0 })
      assert.strictEqual(again.done, 0)
    }))

  it.effect("an unknown backfill name is refused, naming the known ones", () =>
    Effect.gen(function*() {
      const error = yield* Effect.flip((yield* Backfills).run("runs_legacy_scop"))
      assert.strictEqual(error._tag, "UnknownBackfill")
      assert.include(error.message, "runs_legacy_scope")
    }))
})

describe("npm run db:backfill arguments and progress line", () => {
  it("parses a name and options; refuses what it does not understand, naming it", () => {
    assert.deepStrictEqual(parseBackfillArguments(["runs_legacy_scope", "--batch-size=500", "--rate=0"]), {
      name: "runs_legacy_scope",
      batchSize: 500,
      rowsPerSecond: 0
    })
    for (const [args, argument] of [
      [[], "name"],
      [["a", "b"], "name"],
      [["a", "--batch-size=0"], "--batch-size"],
      [["a", "--rate=-1"], "--rate"],
      [["a", "--rate=fast"], "--rate"],
      [["a", "--speed=1"], "--speed"]
    ] as const) {
      const result = parseBackfillArguments(args)
      assert.instanceOf(result, BackfillArgumentError)
      assert.strictEqual((result as BackfillArgumentError).argument, argument)
    }
  })

  it("shows rows done, the rate and the time left", () => {
    assert.strictEqual(
      progressLine({ done: 4_200, total: 10_000, elapsedMs: 4_000 }),
      "[##########--------------]  42% 4,200/10,000 rows  1,050 rows/s  6s left"
    )
    assert.strictEqual(progressLine({ done: 0, total: 0, elapsedMs: 0 }), "[########################] 100% 0/0 rows  0 rows/s  ? left")
  })
})
