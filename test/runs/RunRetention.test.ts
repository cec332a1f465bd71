import { assert, layer } from "@effect/vitest"
import { Effect, Layer, Option } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunRetention } from "../../src/runs/RunRetention.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = Layer.mergeAll(RunRetention.layerWith({ days: 30, batchSize: 2 }), RunsQueue.layer, TranscriptSnapshots.layer).pipe(
  Layer.provideMerge(testDatabaseLayer())
)

const scope = { organizationId: "org", agentId: "agent", conversationId: "retained" }

layer(TestLayer, { excludeTestServices: true })("RunRetention", (it) => {
  it.effect("deletes finished runs past the retention with their superseded transcripts; keeps each conversation's latest completed one", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { sql } = yield* Database
      const send = (extra: object) => Effect.map(queue.send({ queue: "retention", organizationId: "org", payload: {}, ...extra }), (r) => r.id)
      const finish = (id: number, status: string, daysAgo: number) =>
        Effect.promise(() => sql`update runs set status = ${status}, completed_at = now() - ${daysAgo} * interval '1 day' where id = ${id}`)
      const snapshot = (id: number, terminal: string) =>
        Effect.promise(() => sql`insert into agent_transcript_snapshots
          (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
          values ('org', 'agent', 'retained', ${id}, ${`transcript of ${id}\n`}, 10, ${terminal})`)
      const conversationRun = { agentId: "agent", conversationId: "retained" }
      const superseded = yield* send(conversationRun)
      const latest = yield* send(conversationRun)
      const failedAfter = yield* send(conversationRun)
      const noTranscript = yield* send(conversationRun)
      const noConversation = yield* send({})
      const recent = yield* send({})
      const pending = yield* send({})
      for (const [id, status] of [[superseded, "completed"], [latest, "completed"], [failedAfter, "failed"], [noTranscript, "cancelled"], [noConversation, "completed"]] as const) {
        yield* finish(id, status, 40)
      }
      yield* finish(recent, "completed", 1)
      yield* Effect.promise(() => sql`update runs set created_at = now() - interval '40 days' where id = ${pending}`)
      yield* snapshot(superseded, "completed")
      yield* snapshot(latest, "completed")
      yield* snapshot(failedAfter, "failed")

      const result = yield* (yield* RunRetention).prune()
      assert.deepStrictEqual(result, { runs: 4, snapshots: 2 })
      const left = yield* Effect.promise(() => sql<Array<{ id: string }>>`select id::text from runs where queue = 'retention' order by id`)
      assert.deepStrictEqual(left.map((row) => Number(row.id)), [latest, recent, pending])
      const hydrated = yield* (yield* TranscriptSnapshots).latest(scope)
      assert.deepStrictEqual(hydrated, Option.some(`transcript of ${latest}\n`))
      // A second pass finds nothing more.
      assert.deepStrictEqual(yield* (yield* RunRetention).prune(), { runs: 0, snapshots: 0 })
    }))
})
