import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { afterAll, assert, beforeAll, describe, it } from "vitest"
import { Database } from "../../src/db/Database.ts"
import { makeFetchHandler } from "../../src/http/server.ts"
import { maxUploadBodyBytes } from "../../src/http/snapshotUpload.ts"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "../support/testDatabase.ts"
import { Migrator, readJournal } from "../../src/db/Migrator.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { RunOwnership } from "../../src/ownership/RunOwnership.ts"
import { WorkerTokens } from "../../src/ownership/WorkerTokens.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { forgeToken, routeServicesLayer, tokenSecret } from "../support/httpHarness.ts"

const migrate = (url: string) =>
  Effect.runPromise(
    Effect.flatMap(Migrator, (migrator) => migrator.migrate).pipe(
      Effect.provide(Migrator.layer),
      Effect.provide(Database.layerWith({ url: Redacted.make(url), poolMax: 2 }))
    )
  )

describe("the routes as a web fetch handler", () => {
  it("answers in-process: health, admin routes off, 401 without a token", async () => {
    const { handler, dispose } = makeFetchHandler(routeServicesLayer(), { adminToken: undefined })
    try {
      const health = await handler(new Request("http://runlane.test/health"))
      assert.strictEqual(health.status, 200)
      assert.deepStrictEqual(await health.json(), { status: "ok" })
      const admin = await handler(new Request("http://runlane.test/v1/runs", { method: "POST", body: "{}" }))
      assert.strictEqual(admin.status, 404)
      const unauthenticated = await handler(new Request("http://runlane.test/worker/transcript/snapshot"))
      assert.strictEqual(unauthenticated.status, 401)
    } finally {
      await dispose()
    }
  })
})

describe("a body held to its Content-Length, which a fetch handler's Request is not", () => {
  it("refuses a declared length that is not digits, a body longer than the limit behind a small one, and one off its length", async () => {
    const { handler, dispose } = makeFetchHandler(routeServicesLayer(), { adminToken: undefined })
    try {
      const token = await Effect.runPromise(forgeToken({ org: "o", agent: "a", conv: "c", run: 1 }))
      const post = async (contentLength: string, body: string | ReadableStream<Uint8Array>) => {
        const response = await handler(new Request("http://runlane.test/worker/transcript/snapshot", {
          method: "POST",
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "content-length": contentLength },
          body,
          duplex: "half"
        } as RequestInit))
        return { status: response.status, body: await response.json() }
      }
      const json = JSON.stringify({ runId: 1, snapshotJsonl: "{}" })
      assert.deepStrictEqual(await post("1e3", "x".repeat(1_000)), { status: 400, body: { error: "Invalid Content-Length" } })
      assert.deepStrictEqual(await post("0x20", json), { status: 400, body: { error: "Invalid Content-Length" } })
      // A body longer than its declared length is not read past it (nor past the limit): not even an endless one.
      assert.deepStrictEqual(await post("10", "x".repeat(maxUploadBodyBytes + 1)), {
        status: 413,
        body: { error: `Request body over the limit of ${maxUploadBodyBytes} bytes` }
      })
      let pulled = 0
      const endless = new ReadableStream<Uint8Array>({
        pull: (controller) => {
          pulled += 1024 * 1024
          controller.enqueue(new Uint8Array(1024 * 1024))
        }
      })
      assert.deepStrictEqual(await post("10", endless), { status: 400, body: { error: "The request body could not be read" } })
      assert.isAtMost(pulled, 4 * 1024 * 1024, "bytes pulled from the endless body")
      assert.deepStrictEqual(await post(String(json.length + 5), json), {
        status: 400,
        body: { error: `The request body is ${json.length} bytes, not its Content-Length of ${json.length + 5}` }
      })
    } finally {
      await dispose()
    }
  })
})

describe("readiness", () => {
  let database: TestDatabaseHandle
  beforeAll(async () => {
    database = await createDatabase({ migrated: false })
  })
  afterAll(async () => {
    await dropDatabase(database.name)
  })

  it("is 503 while a migration is pending, 200 once applied, and then the snapshot routes work", async () => {
    const services = Layer.mergeAll(
      Migrator.layer,
      ConversationLocks.layerWith({ cap: 1 }),
      RunsQueue.layer,
      RunOwnership.layer,
      TranscriptSnapshots.layer,
      WorkerTokens.layerWith({ secret: Redacted.make(tokenSecret) })
    ).pipe(Layer.provideMerge(Database.layerWith({ url: Redacted.make(database.url), poolMax: 4 })))
    const adminToken = "fetch-handler-admin-token"
    const { handler, dispose } = makeFetchHandler(services, { adminToken: Redacted.make(adminToken) })
    try {
      const pending = await handler(new Request("http://runlane.test/health/ready"))
      assert.strictEqual(pending.status, 503)
      // Every committed migration is pending on an empty database.
      assert.include((await pending.json() as { error: string }).error, `${readJournal().length} migration(s) pending`)
      await migrate(database.url)
      const ready = await handler(new Request("http://runlane.test/health/ready"))
      assert.strictEqual(ready.status, 200)

      const sql = postgres(database.url, { max: 1, onnotice: () => {} })
      const [run] = await sql<Array<{ id: string }>>`
        insert into runs (organization_id, agent_id, conversation_id, queue, action_input)
        values ('o', 'a', 'c', 'messages', '{}') returning id::text`
      await sql.end({ timeout: 5 })
      const runId = Number(run!.id)
      const token = await Effect.runPromise(forgeToken({ org: "o", agent: "a", conv: "c", run: runId }))
      const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" }
      const snapshot = "{\"type\":\"session\"}\n"
      const upload = await handler(new Request("http://runlane.test/worker/transcript/snapshot", {
        method: "POST",
        headers,
        body: JSON.stringify({ runId, terminalStatus: "completed", snapshotJsonl: snapshot })
      }))
      assert.strictEqual(upload.status, 200, await upload.clone().text())
      const latest = await handler(new Request("http://runlane.test/worker/transcript/snapshot", { headers }))
      assert.strictEqual(await latest.text(), snapshot)
      const minted = await handler(new Request(`http://runlane.test/v1/runs/${runId}/token`, {
        method: "POST",
        headers: { authorization: `Bearer ${adminToken}` }
      }))
      assert.strictEqual(minted.status, 200)
    } finally {
      await dispose()
    }
  })
})
