import { assert, describe, it, layer } from "@effect/vitest"
import { generateDrizzleJson, generateMigration } from "drizzle-kit/api"
import { readFileSync } from "node:fs"
import { Effect, Layer } from "effect"
import { Database } from "../../src/db/Database.ts"
import { migrationsFolder, readJournal } from "../../src/db/Migrator.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import * as schema from "../../src/schema/index.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

describe("committed migrations", () => {
  it.effect("match src/schema exactly (run `npm run db:generate` after changing the schema)", () =>
    Effect.promise(async () => {
      const last = readJournal().at(-1)!
      const snapshot = JSON.parse(
        readFileSync(`${migrationsFolder}/meta/${last.tag.slice(0, 4)}_snapshot.json`, "utf8")
      ) as Parameters<typeof generateMigration>[0]
      const current = generateDrizzleJson(schema, snapshot.id)
      const statements = await generateMigration(snapshot, current)
      assert.deepStrictEqual(statements, [])
    }))
})

const TestLayer = RunsQueue.layer.pipe(Layer.provideMerge(testDatabaseLayer()))

layer(TestLayer, { excludeTestServices: true })("schema constraints", (it) => {
  const insertSnapshot = (runId: number, terminalStatus: string) =>
    Effect.gen(function*() {
      const { use } = yield* Database
      return yield* use("test.insertSnapshot", (sql) =>
        sql`
          insert into agent_transcript_snapshots
            (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
          values ('org', 'agent', 'conv', ${runId}, '{"type":"session"}', 18, ${terminalStatus})`)
    })

  const sendRun = Effect.gen(function*() {
    const queue = yield* RunsQueue
    return (yield* queue.send({ queue: "messages", organizationId: "org", agentId: "agent", conversationId: "conv", payload: {} })).id
  })

  it.effect("deleting a run that has a snapshot fails loudly and keeps the snapshot", () =>
    Effect.gen(function*() {
      const { use } = yield* Database
      const runId = yield* sendRun
      yield* insertSnapshot(runId, "completed")
      const error = yield* Effect.flip(use("test.deleteRun", (sql) => sql`delete from runs where id = ${runId}`))
      // PostgreSQL 18 reports restrict_violation (23001); earlier majors foreign_key_violation (23503).
      assert.include(["23001", "23503"], error.sqlState)
      assert.isFalse(error.retryable)
      const [row] = yield* use("test", (sql) =>
        sql<Array<{ n: number }>>`select count(*)::int as n from agent_transcript_snapshots where run_id = ${runId}`)
      assert.strictEqual(row!.n, 1)
      const otherRun = yield* sendRun
      yield* use("test.deleteRun", (sql) => sql`delete from runs where id = ${otherRun}`)
    }))

  it.effect("terminal_status accepts the four terminal statuses and nothing else", () =>
    Effect.gen(function*() {
      for (const status of ["completed", "failed", "timeout", "cancelled"]) {
        yield* insertSnapshot(yield* sendRun, status)
      }
      const error = yield* Effect.flip(insertSnapshot(yield* sendRun, "nope"))
      assert.strictEqual(error.sqlState, "23514")
    }))

  it.effect("action_input must be a jsonb object, even for writers that bypass RunsQueue", () =>
    Effect.gen(function*() {
      const { use } = yield* Database
      for (const value of ["\"{\\\"agentId\\\":\\\"a\\\"}\"", "[1]", "1", "null"]) {
        const error = yield* Effect.flip(use("test", (sql) =>
          sql`insert into runs (organization_id, queue, action_input) values ('org', 'q', ${value}::text::jsonb)`))
        assert.strictEqual(error.sqlState, "23514", value)
      }
    }))

  it.effect("a claimed run must name its owner, and no other status may", () =>
    Effect.gen(function*() {
      const { use } = yield* Database
      const runId = yield* sendRun
      const error = yield* Effect.flip(use("test", (sql) => sql`update runs set status = 'claimed' where id = ${runId}`))
      assert.strictEqual(error.sqlState, "23514")
      yield* use("test", (sql) =>
        sql`update runs set status = 'claimed', claimed_by = 'w1', claimed_at = now() where id = ${runId}`)
    }))
})
