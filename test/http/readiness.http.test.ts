/**
 * /health/ready waits for required backfills as it waits for migrations: 503 while rows written by an
 * older writer are still marked legacy_scope and runs_legacy_scope has not finished, 200 afterwards.
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { Backfills } from "../../src/backfills/Backfills.ts"
import { Database } from "../../src/db/Database.ts"
import { call, testServerLayer } from "../support/httpHarness.ts"

layer(Backfills.layer.pipe(Layer.provideMerge(testServerLayer())), { excludeTestServices: true })("readiness", (it) => {
  it.effect("is 503 while the runs_legacy_scope backfill is unfinished, 200 once it has run", () =>
    Effect.gen(function*() {
      assert.strictEqual((yield* call("GET", "/health/ready")).status, 200)
      const { use } = yield* Database
      yield* use("test.insertLegacy", (sql) =>
        sql`insert into runs (organization_id, queue, action_input) values ('org', 'q', '{"agentId":"a","conversationId":"c"}')`)
      const waiting = yield* call("GET", "/health/ready")
      assert.strictEqual(waiting.status, 503)
      assert.strictEqual((waiting.json as { error: string }).error, "Backfill unfinished")
      yield* (yield* Backfills).run("runs_legacy_scope", { rowsPerSecond: 0 })
      assert.strictEqual((yield* call("GET", "/health/ready")).status, 200)
    }))
})
