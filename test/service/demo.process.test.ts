/**
 * `npm run demo` as a user runs it: its own service in its process, a workload, a summary whose
 * claims come from the database. Small here (the default is 2,000 runs) so the suite stays quick.
 */
import postgres from "postgres"
import { afterAll, assert, beforeAll, describe, it } from "vitest"
import { exitWithin, startService } from "../support/serviceProcess.ts"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "../support/testDatabase.ts"

let database: TestDatabaseHandle

beforeAll(async () => {
  database = await createDatabase({ migrated: false })
})
afterAll(async () => {
  await dropDatabase(database.name)
})

describe("npm run demo", () => {
  it("runs a workload through its own service and reports it from the database: every run once, in order, one in flight per conversation", async () => {
    const demo = startService("src/demo.ts", { DATABASE_URL: database.url, RUNLANE_TOKEN_SECRET: "a-demo-test-secret-of-32-bytes-or-more" }, [
      "--runs=120", "--conversations=12", "--work-ms=5", "--fail-every=40"
    ])
    const exit = await exitWithin(demo, 120_000)
    const output = demo.output()
    assert.deepStrictEqual(exit, { code: 0, signal: null }, output)
    assert.match(output, /runs: +120 over 12 conversations on queue "demo", enqueued in [0-9.]+ s/)
    assert.match(output, /finished: +120 completed, 0 failed in [0-9.]+ s: [0-9,]+ runs\/s/)
    assert.match(output, /retries: +3\n/, "runs 40, 80 and 120 each failed their first attempt once")
    assert.match(output, /in flight: +at most 1 run\(s\) of one conversation at once/)
    assert.match(output, /order: +every conversation's runs finished in enqueue order/)
    assert.match(output, /result: +ok/)

    // What the summary says, checked again independently.
    const sql = postgres(database.url, { max: 1, onnotice: () => {} })
    try {
      const [row] = await sql<Array<{ completed: number; attempts: number; claimed: number; snapshots: number }>>`
        select count(*) filter (where status = 'completed')::int as completed, sum(attempts)::int as attempts,
               count(*) filter (where status = 'claimed')::int as claimed,
               (select count(*)::int from agent_transcript_snapshots) as snapshots
          from runs where queue = 'demo'`
      assert.deepStrictEqual(row, { completed: 120, attempts: 3, claimed: 0, snapshots: 120 })
    } finally {
      await sql.end({ timeout: 5 })
    }
  })

  it("refuses a bad option, naming it", async () => {
    const demo = startService("src/demo.ts", { DATABASE_URL: database.url }, ["--runs=many"])
    const exit = await exitWithin(demo, 60_000)
    assert.strictEqual(exit.code, 1)
    assert.include(demo.output(), `--runs must be a whole number from 1 to 1000000, got "many"`)
  })
})
