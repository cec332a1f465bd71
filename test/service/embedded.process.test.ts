/**
 * The built service (what `npm start` runs) on its embedded PostgreSQL, as a separate process: the
 * superuser password, who owns the process's signals, a database that dies under it, and start-up
 * after a crash. Every test uses one data folder, made by the first start.
 */
import { spawn } from "node:child_process"
import { chmod, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import postgres from "postgres"
import { afterAll, afterEach, assert, beforeAll, describe, it } from "vitest"
import { builtEntry, exitWithin, type ServiceProcess, startService } from "../support/serviceProcess.ts"

const adminToken = "embedded-process-admin-token"
let dataDir: string
const started: Array<ServiceProcess> = []
/** The last running server's lock file, to fake one a crash left behind. */
let postmasterPidContents = ""

beforeAll(async () => {
  dataDir = await mkdtemp(join(tmpdir(), "runlane-embedded-"))
  // The embedded server runs as `postgres` under root; it must be able to enter the folder.
  await chmod(dataDir, 0o755)
})
afterEach(() => {
  // A failed test may leave its service running; nothing else would stop it.
  for (const service of started.splice(0)) if (!service.done()) service.signal("SIGKILL")
})
afterAll(async () => {
  await rm(dataDir, { recursive: true, force: true })
})

/** Starts the service on the shared data folder and waits until it listens. */
const start = async () => {
  const service = startService(builtEntry, { PORT: "0", RUNLANE_DATA_DIR: dataDir, RUNLANE_ADMIN_TOKEN: adminToken })
  started.push(service)
  const [, baseUrl] = await service.waitFor(/runlane listening on (http:\/\/[0-9.:]+)/, 120_000)
  const [, port] = await service.waitFor(/Using embedded PostgreSQL at postgres:\/\/postgres:\*\*\*@127\.0\.0\.1:([0-9]+)\//)
  postmasterPidContents = await readFile(postmasterPidFile(), "utf8")
  return { service, baseUrl: baseUrl!, databasePort: Number(port) }
}

const passwordFile = () => join(dataDir, "postgres-password")
const postmasterPidFile = () => join(dataDir, "pgdata", "postmaster.pid")

const connect = (port: number, password: string) =>
  postgres({ host: "127.0.0.1", port, user: "postgres", password, database: "runlane", max: 2, onnotice: () => {} })

/** Polls `check` every 50 ms until it is true, failing with `what` after `timeoutMs`. */
const eventually = async (what: string, check: () => Promise<boolean>, timeoutMs = 20_000) => {
  const deadline = Date.now() + timeoutMs
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

/** A run and its worker token, through the admin routes. */
const runWithToken = async (baseUrl: string) => {
  const headers = { authorization: `Bearer ${adminToken}` }
  const created = await fetch(`${baseUrl}/v1/runs`, {
    method: "POST",
    headers,
    body: JSON.stringify({ queue: "q", organizationId: "org", agentId: "agent", conversationId: "conv", payload: {} })
  })
  const { id } = await created.json() as { id: number }
  const minted = await fetch(`${baseUrl}/v1/runs/${id}/token`, { method: "POST", headers })
  const { token } = await minted.json() as { token: string }
  return { runId: id, token }
}

describe("the built service on its embedded PostgreSQL", () => {
  it("generates the superuser's password beside the data (mode 600, never logged); the published one is refused", async () => {
    const { service, databasePort } = await start()
    const password = (await readFile(passwordFile(), "utf8")).trim()
    assert.isAtLeast(password.length, 40)
    assert.strictEqual((await stat(passwordFile())).mode & 0o777, 0o600)
    assert.notInclude(service.output(), password)

    const published = connect(databasePort, "runlane")
    const refused = await published`select 1`.then(() => undefined, (error: { code?: string }) => error.code)
    await published.end({ timeout: 5 })
    assert.strictEqual(refused, "28P01", "the published password must not log in")
    const generated = connect(databasePort, password)
    assert.deepStrictEqual([...await generated`select 1 as one`], [{ one: 1 }])
    await generated.end({ timeout: 5 })

    service.signal("SIGTERM")
    assert.strictEqual((await exitWithin(service, 60_000)).code, 0, service.output())
  }, 180_000)

  it("moves a cluster still on the old published password to the generated one", async () => {
    const password = (await readFile(passwordFile(), "utf8")).trim()
    const first = await start()
    const sql = connect(first.databasePort, password)
    await sql.unsafe("alter role postgres password 'runlane'")
    await sql.end({ timeout: 5 })
    first.service.signal("SIGTERM")
    assert.strictEqual((await exitWithin(first.service, 60_000)).code, 0, first.service.output())

    const { service, databasePort } = await start()
    const published = connect(databasePort, "runlane")
    const refused = await published`select 1`.then(() => undefined, (error: { code?: string }) => error.code)
    await published.end({ timeout: 5 })
    assert.strictEqual(refused, "28P01", "the published password must no longer log in")
    service.signal("SIGTERM")
    assert.strictEqual((await exitWithin(service, 60_000)).code, 0, service.output())
  }, 180_000)

  it("SIGTERM with an upload in flight: the upload completes (200) and the process exits 0", async () => {
    const { service, baseUrl, databasePort } = await start()
    const { runId, token } = await runWithToken(baseUrl)
    const blocker = connect(databasePort, (await readFile(passwordFile(), "utf8")).trim())
    const locked = await blocker.reserve()
    try {
      await locked`begin`
      await locked`lock table agent_transcript_snapshots in exclusive mode`
      const upload = fetch(`${baseUrl}/worker/transcript/snapshot`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
        body: JSON.stringify({ runId, terminalStatus: "completed", snapshotJsonl: "{\"type\":\"session\"}\n" })
      })
      await eventually("the upload's INSERT waiting on the table lock", async () => {
        const [row] = await blocker<Array<{ n: number }>>`
          select count(*)::int as n from pg_stat_activity
          where wait_event_type = 'Lock' and query ilike '%agent_transcript_snapshots%'`
        return (row?.n ?? 0) > 0
      })
      service.signal("SIGTERM")
      await service.waitFor(/runlane is shutting down/)
      await locked`rollback`
      locked.release()
      const response = await upload
      assert.strictEqual(response.status, 200, await response.text())
    } finally {
      await blocker.end({ timeout: 5 })
    }
    const exit = await exitWithin(service, 60_000)
    assert.strictEqual(exit.code, 0, service.output())
    assert.include(service.output(), "Embedded PostgreSQL stopped")
  }, 180_000)

  it("starts after a crash left a postmaster.pid naming a live unrelated process and an empty token-secret; SIGHUP stops it in order", async () => {
    const unrelated = spawn("sleep", ["300"], { stdio: "ignore" })
    try {
      const [, ...rest] = postmasterPidContents.split("\n")
      await writeFile(postmasterPidFile(), [String(unrelated.pid), ...rest].join("\n"))
      await writeFile(join(dataDir, "token-secret"), "")

      const { service, baseUrl } = await start()
      assert.include(service.output(), `names pid ${unrelated.pid}, which is not a PostgreSQL server of this data folder`)
      assert.include(service.output(), "newly generated secret")
      assert.isAtLeast((await readFile(join(dataDir, "token-secret"), "utf8")).trim().length, 32)
      assert.strictEqual((await fetch(`${baseUrl}/health/ready`)).status, 200)

      service.signal("SIGHUP")
      const exit = await exitWithin(service, 60_000)
      assert.strictEqual(exit.code, 0, service.output())
      const output = service.output()
      const order = ["runlane is shutting down", "HTTP server stopped", "Database pool closed", "Embedded PostgreSQL stopped"]
        .map((line) => output.indexOf(line))
      assert.notInclude(order, -1, output)
      assert.deepStrictEqual(order, [...order].sort((a, b) => a - b), output)
    } finally {
      unrelated.kill("SIGKILL")
    }
  }, 180_000)

  it("stops with a non-zero exit within 30 s when its PostgreSQL is killed", async () => {
    const { service } = await start()
    const postmaster = Number((await readFile(postmasterPidFile(), "utf8")).split("\n")[0])
    process.kill(postmaster, "SIGKILL")
    const exit = await exitWithin(service, 30_000)
    assert.notStrictEqual(exit.code, 0, service.output())
    assert.include(service.output(), "Embedded PostgreSQL exited unexpectedly")
  }, 180_000)
})
