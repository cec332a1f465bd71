import { chmod, mkdtemp, readFile, rm, stat } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import postgres from "postgres"
import { afterAll, assert, beforeAll, describe, it } from "vitest"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "../support/testDatabase.ts"
import { builtEntry, exitWithin, startService } from "../support/serviceProcess.ts"

const secret = "a-process-test-secret-of-32-bytes-or-more"
let database: TestDatabaseHandle

beforeAll(async () => {
  database = await createDatabase({ migrated: false })
})
afterAll(async () => {
  await dropDatabase(database.name)
})

const env = (extra: Record<string, string> = {}) => ({
  DATABASE_URL: database.url,
  RUNLANE_TOKEN_SECRET: secret,
  PORT: "0",
  ...extra
})

const advisoryLocksHeld = async (): Promise<number> => {
  const sql = postgres(database.url, { max: 1, onnotice: () => {} })
  try {
    const [row] = await sql<Array<{ n: number }>>`
      select count(*)::int as n from pg_locks where locktype = 'advisory' and granted and objsubid = 2`
    return row?.n ?? -1
  } finally {
    await sql.end({ timeout: 5 })
  }
}

describe("the service process", () => {
  it("SIGTERM with a conversation lock held: the lock is released and the count is zero before the process exits", async () => {
    const service = startService("test/support/serviceWithHeldLock.ts", env())
    const [, baseUrl] = await service.waitFor(/runlane listening on (http:\/\/[0-9.:]+)/)
    await service.waitFor(/test holder: holding the lock/)
    const usage = await (await fetch(`${baseUrl}/health/orchestrator`)).json() as Record<string, unknown>
    assert.strictEqual(usage["reserved_conversation_locks"], 1)
    assert.strictEqual(await advisoryLocksHeld(), 1)

    service.signal("SIGTERM")
    const exit = await exitWithin(service, 30_000)
    const output = service.output()
    assert.strictEqual(exit.code, 0, output)
    const order = [
      "runlane is shutting down",
      "HTTP server stopped",
      "test holder: released; reserved=0",
      "Conversation locks closed: none held",
      "Database pool closed"
    ].map((line) => output.indexOf(line))
    assert.notInclude(order, -1, output)
    assert.deepStrictEqual(order, [...order].sort((a, b) => a - b), output)
    assert.strictEqual(await advisoryLocksHeld(), 0)
  })

  it("SIGINT stops it too, after it has served requests", async () => {
    const service = startService(builtEntry, env())
    const [, baseUrl] = await service.waitFor(/runlane listening on (http:\/\/[0-9.:]+)/)
    assert.strictEqual((await fetch(`${baseUrl}/health/ready`)).status, 200)
    service.signal("SIGINT")
    const exit = await exitWithin(service, 30_000)
    assert.strictEqual(exit.code, 0, service.output())
    assert.include(service.output(), "Database pool closed")
  })

  it("a second start on a port in use says so and exits", async () => {
    const first = startService(builtEntry, env())
    const [, port] = await first.waitFor(/runlane listening on http:\/\/[0-9.]+:([0-9]+)/)
    const second = startService(builtEntry, env({ PORT: port! }))
    const exit = await exitWithin(second, 30_000)
    assert.notStrictEqual(exit.code, 0)
    assert.include(second.output(), `port ${port} on 127.0.0.1 is in use`)
    first.signal("SIGTERM")
    assert.strictEqual((await exitWithin(first, 30_000)).code, 0)
  })

  it("embedded database: a generated token secret kept beside the data, and a second start on the same data folder says it is in use", async () => {
    const dataDir = await mkdtemp(join(tmpdir(), "runlane-service-"))
    // The embedded server runs as `postgres` under root; it must be able to enter the folder.
    await chmod(dataDir, 0o755)
    try {
      const embeddedEnv = { PORT: "0", RUNLANE_DATA_DIR: dataDir }
      const first = startService(builtEntry, embeddedEnv)
      await first.waitFor(/runlane listening on/, 120_000)
      assert.include(first.output(), `RUNLANE_TOKEN_SECRET is not set: using the newly generated secret in ${dataDir}/token-secret`)
      const secretFile = await readFile(join(dataDir, "token-secret"), "utf8")
      assert.isAtLeast(secretFile.trim().length, 32)
      assert.strictEqual((await stat(join(dataDir, "token-secret"))).mode & 0o777, 0o600)

      const second = startService(builtEntry, embeddedEnv)
      assert.notStrictEqual((await exitWithin(second, 60_000)).code, 0)
      assert.include(second.output(), `the data folder ${dataDir}/pgdata is in use`)
      first.signal("SIGTERM")
      assert.strictEqual((await exitWithin(first, 60_000)).code, 0, first.output())
      assert.include(first.output(), "Embedded PostgreSQL stopped")

      // A restart finds the same data and the same secret.
      const again = startService(builtEntry, embeddedEnv)
      await again.waitFor(/runlane listening on/, 120_000)
      assert.include(again.output(), "using the generated secret")
      assert.include(again.output(), "(0 just now)")
      again.signal("SIGINT")
      assert.strictEqual((await exitWithin(again, 60_000)).code, 0, again.output())
    } finally {
      await rm(dataDir, { recursive: true, force: true })
    }
  })

  it("a bad setting stops it at start, naming the variable", async () => {
    const cases: ReadonlyArray<readonly [string, Record<string, string>]> = [
      ["RUNLANE_TOKEN_SECRET", { RUNLANE_TOKEN_SECRET: "too-short" }],
      ["RUNLANE_TOKEN_SECRET", { RUNLANE_TOKEN_SECRET: "" }],
      ["RUNLANE_ADMIN_TOKEN", { RUNLANE_ADMIN_TOKEN: "short" }],
      ["PORT", { PORT: "70000" }],
      ["PORT", { PORT: "eighty" }],
      ["DB_POOL_MAX", { DB_POOL_MAX: "0" }],
      ["RUNLANE_MAX_RESERVED_LOCKS", { RUNLANE_MAX_RESERVED_LOCKS: "-1" }],
      ["RUNLANE_UPLOAD_BODIES_MAX_BYTES", { RUNLANE_UPLOAD_BODIES_MAX_BYTES: "0" }]
    ]
    await Promise.all(cases.map(async ([variable, bad]) => {
      const service = startService(builtEntry, env(bad))
      const exit = await exitWithin(service, 30_000)
      assert.notStrictEqual(exit.code, 0, `${variable}=${JSON.stringify(bad)}`)
      assert.include(service.output(), variable, service.output())
      assert.notInclude(service.output(), "runlane listening on")
    }))
    // With DATABASE_URL, a token secret is required (one is generated only beside the embedded database).
    const { RUNLANE_TOKEN_SECRET: _, ...withoutSecret } = env()
    const service = startService(builtEntry, withoutSecret)
    assert.notStrictEqual((await exitWithin(service, 30_000)).code, 0)
    assert.include(service.output(), "RUNLANE_TOKEN_SECRET is not set")
  })
})
