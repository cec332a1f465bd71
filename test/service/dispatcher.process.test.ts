/**
 * `npm start` is an orchestrator: the built service works the `demo` queue with the demo handler,
 * which hydrates from the conversation's transcript, appends its turn and uploads it through the HTTP
 * API with the run's token. Driven here through the HTTP API only, as an operator would.
 */
import postgres from "postgres"
import { afterAll, assert, beforeAll, describe, it } from "vitest"
import { builtEntry, exitWithin, startService } from "../support/serviceProcess.ts"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "../support/testDatabase.ts"

const adminToken = "an-admin-token-for-the-dispatch-test"
let database: TestDatabaseHandle

beforeAll(async () => {
  database = await createDatabase({ migrated: false })
})
afterAll(async () => {
  await dropDatabase(database.name)
})

/** Polls `check` every 50 ms until it answers true, for at most `timeoutMs`. */
const eventually = async (what: string, check: () => Promise<boolean>, timeoutMs: number) => {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting: ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

describe("npm start's work loop", () => {
  it("works the demo queue with the demo handler: each conversation's turns uploaded in enqueue order, a retry counted, exit 0 with nothing claimed", async () => {
    const service = startService(builtEntry, {
      DATABASE_URL: database.url,
      RUNLANE_TOKEN_SECRET: "a-process-test-secret-of-32-bytes-or-more",
      RUNLANE_ADMIN_TOKEN: adminToken,
      PORT: "0"
    })
    const [, baseUrl] = await service.waitFor(/runlane listening on (http:\/\/[0-9.:]+)/, 60_000)
    await service.waitFor(/Run worker: the demo handler works queue "demo"/)
    const admin = (method: string, path: string, body?: unknown) =>
      fetch(`${baseUrl}${path}`, {
        method,
        headers: { authorization: `Bearer ${adminToken}`, "content-type": "application/json" },
        ...(body === undefined ? {} : { body: JSON.stringify(body) })
      }).then(async (response) => ({ status: response.status, json: await response.json() as Record<string, unknown> }))

    // Two conversations of four turns, interleaved; the second run of conversation a fails once.
    const ids: Array<{ id: number; conversation: string }> = []
    for (let turn = 0; turn < 4; turn++) {
      for (const conversation of ["a", "b"]) {
        const payload = { workMs: 5, ...(conversation === "a" && turn === 1 ? { failAttempts: 1 } : {}) }
        const answer = await admin("POST", "/v1/runs", {
          queue: "demo", organizationId: "org", agentId: "agent", conversationId: conversation, payload
        })
        assert.strictEqual(answer.status, 200, JSON.stringify(answer.json))
        ids.push({ id: answer.json["id"] as number, conversation })
      }
    }
    await eventually("every run completed", async () => {
      const states = await Promise.all(ids.map(({ id }) => admin("GET", `/v1/runs/${id}`)))
      return states.every((state) => state.json["status"] === "completed")
    }, 60_000)
    const retried = await admin("GET", `/v1/runs/${ids[2]!.id}`)
    assert.strictEqual(retried.json["attempts"], 1, "the run that failed once spent one attempt")

    for (const conversation of ["a", "b"]) {
      const last = ids.filter((entry) => entry.conversation === conversation).at(-1)!
      const { json } = await admin("POST", `/v1/runs/${last.id}/token`)
      const transcript = await fetch(`${baseUrl}/worker/transcript/snapshot`, {
        headers: { authorization: `Bearer ${String(json["token"])}` }
      }).then((response) => response.text())
      const turns = transcript.trimEnd().split("\n").map((line) => JSON.parse(line) as { run: number; text: string })
      assert.deepStrictEqual(
        turns.map((turn) => turn.run),
        ids.filter((entry) => entry.conversation === conversation).map((entry) => entry.id),
        `conversation ${conversation}: every turn hydrated from the one before, in enqueue order`
      )
      assert.strictEqual(turns.at(-1)!.text, `turn 4 of ${conversation}`)
    }

    const metrics = await fetch(`${baseUrl}/metrics`).then((response) => response.text())
    assert.match(metrics, /^runlane_runs_completed_total\{queue="demo"\} 8$/m)
    assert.match(metrics, /^runlane_runs_failed_attempts_total\{queue="demo"\} 1$/m)
    assert.match(metrics, /^runlane_run_start_latency_seconds_count\{queue="demo"\} 8$/m)
    const orchestrator = await fetch(`${baseUrl}/health/orchestrator`).then((response) => response.json()) as Record<string, unknown>
    assert.strictEqual(orchestrator["conversations_served"], 2, "both conversations kept for their next turn")

    service.signal("SIGTERM")
    const exit = await exitWithin(service, 30_000)
    assert.strictEqual(exit.code, 0, service.output())
    const sql = postgres(database.url, { max: 1, onnotice: () => {} })
    try {
      const [row] = await sql<Array<{ claimed: number; locks: number }>>`
        select (select count(*)::int from runs where status = 'claimed') as claimed,
               (select count(*)::int from pg_locks where locktype = 'advisory' and granted and objsubid = 2) as locks`
      assert.deepStrictEqual(row, { claimed: 0, locks: 0 })
    } finally {
      await sql.end({ timeout: 5 })
    }
  })
})
