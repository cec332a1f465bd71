/**
 * The unauthenticated routes under load, and upload admission, against the real server. Every
 * interleaving is made by the database (a table lock held by the test) and observed through
 * pg_stat_activity, never by timing.
 */
import { assert, describe, layer } from "@effect/vitest"
import { ConfigProvider, Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { maxProbeQueries } from "../../src/http/probeBudget.ts"
import { TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { eventually } from "../support/lockHarness.ts"
import { call, runWithToken, TestServer, testServerLayer } from "../support/httpHarness.ts"

/**
 * A client of its own for the test's locks and observations: the service's pool may be the very
 * thing that is exhausted.
 */
const observer = Effect.acquireRelease(
  Effect.map(Database, ({ url }) => postgres(Redacted.value(url), { max: 3, onnotice: () => {} })),
  (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
)

/** Statements of this database whose text contains `fragment` and that wait on a lock. */
const waitingStatements = (sql: postgres.Sql, fragment: string) =>
  Effect.promise(async () => {
    const [row] = await sql<Array<{ n: number }>>`
      select count(*)::int as n from pg_stat_activity
       where datname = current_database() and wait_event_type = 'Lock'
         and position(${fragment} in query) > 0 and pid <> pg_backend_pid()`
    return row!.n
  })

/** A transaction on its own connection holding `lock`, until the scope closes. */
const holdingLock = (sql: postgres.Sql, lock: string) =>
  Effect.acquireRelease(
    Effect.promise(async () => {
      const holder = await sql.reserve()
      await holder`begin`
      await holder.unsafe(lock)
      return holder
    }),
    (holder) => Effect.promise(async () => {
      await holder`rollback`
      holder.release()
    })
  )

interface Fetched {
  readonly status: number
  readonly retryAfter: string | null
  readonly text: string
}

/** Requests sent at once with plain fetch; `answered` counts the answers so far. */
const sendAll = (baseUrl: string, requests: ReadonlyArray<{ readonly path: string; readonly init?: RequestInit }>) => {
  const progress = { answered: 0 }
  const answers = requests.map(async ({ init, path }): Promise<Fetched> => {
    const response = await fetch(`${baseUrl}${path}`, init)
    const text = await response.text()
    progress.answered++
    return { status: response.status, retryAfter: response.headers.get("retry-after"), text }
  })
  return { progress, answers: Promise.all(answers) }
}

const countStatement = "from runs group by queue, status"
const migrationsStatement = "__drizzle_migrations"

layer(testServerLayer(), { excludeTestServices: true })("unauthenticated routes share a small database budget", (it) => {
  it.effect("concurrent stale /metrics scrapes run one count; the others answer at once without waiting for it", () =>
    Effect.gen(function*() {
      const sql = yield* observer
      const { baseUrl } = yield* TestServer
      yield* holdingLock(sql, "lock table runs in access exclusive mode")
      const scrapes = sendAll(baseUrl, Array.from({ length: 10 }, () => ({ path: "/metrics" })))
      // While the count waits on the lock, nine scrapes are answered; never more than one count runs.
      yield* eventually(
        "nine scrapes answered while one count waits",
        Effect.map(waitingStatements(sql, countStatement), (counting) => {
          assert.isAtMost(counting, 1, "count statements running at once")
          return counting === 1 && scrapes.progress.answered === 9
        })
      )
      return scrapes
    }).pipe(
      Effect.scoped,
      Effect.flatMap((scrapes) => Effect.promise(() => scrapes.answers)),
      Effect.map((answers) => {
        assert.deepStrictEqual(answers.map((answer) => answer.status), Array.from({ length: 10 }, () => 200))
        assert.strictEqual(answers.filter((answer) => /^runlane_runs_count_up 0$/m.test(answer.text)).length >= 9, true)
      })
    ))

  it.effect("/health/ready runs at most maxProbeQueries queries at once; beyond them it, /metrics and /health/orchestrator answer at once", () =>
    Effect.gen(function*() {
      const sql = yield* observer
      const { baseUrl } = yield* TestServer
      yield* holdingLock(sql, "lock table drizzle.__drizzle_migrations in access exclusive mode")
      const probes = sendAll(baseUrl, Array.from({ length: 10 }, () => ({ path: "/health/ready" })))
      yield* eventually(
        "the probes beyond the budget answered while the budget's queries wait",
        Effect.map(waitingStatements(sql, migrationsStatement), (waiting) => {
          assert.isAtMost(waiting, maxProbeQueries, "readiness queries running at once")
          return waiting === maxProbeQueries && probes.progress.answered === 10 - maxProbeQueries
        })
      )
      const answered = yield* Effect.promise(() => Promise.all([fetch(`${baseUrl}/metrics`), fetch(`${baseUrl}/health/orchestrator`)]))
      assert.deepStrictEqual(answered.map((response) => response.status), [200, 200])
      const orchestrator = (yield* Effect.promise(() => answered[1]!.json())) as Record<string, unknown>
      assert.strictEqual(orchestrator["held_in_database"], null)
      return probes
    }).pipe(
      Effect.scoped,
      Effect.flatMap((probes) => Effect.promise(() => probes.answers)),
      Effect.map((answers) => {
        const refused = answers.filter((answer) => answer.status === 503)
        assert.isAtLeast(refused.length, 10 - maxProbeQueries)
        for (const answer of refused) assert.deepStrictEqual(JSON.parse(answer.text), { error: "Database unavailable" })
      })
    ))

  it.effect("/health/ready names no migration to an anonymous caller when the migrations do not match", () =>
    Effect.gen(function*() {
      const { sql } = yield* Database
      // The fault: an applied migration's recorded hash no longer matches its file.
      yield* Effect.acquireRelease(
        Effect.promise(() => sql`update drizzle.__drizzle_migrations set hash = 'x' || hash`),
        () => Effect.promise(() => sql`update drizzle.__drizzle_migrations set hash = substr(hash, 2)`)
      )
      const ready = yield* call("GET", "/health/ready")
      assert.strictEqual(ready.status, 503)
      assert.deepStrictEqual(ready.json, { error: "Migrations do not match this version" })
    }).pipe(Effect.scoped))
})

const admissionEnv = { RUNLANE_UPLOAD_QUEUE_MAX: "1", RUNLANE_UPLOAD_QUEUE_TIMEOUT_MS: "1500" }

layer(testServerLayer({ env: admissionEnv }), { excludeTestServices: true })("upload admission", (it) => {
  it.effect("beyond the queue bound an upload is 503 with Retry-After at once; a queued one is 503 at its deadline; nothing of theirs is stored", () =>
    Effect.gen(function*() {
      const { sql } = yield* Database
      const { baseUrl } = yield* TestServer
      const uploads = yield* Effect.forEach(Array.from({ length: 6 }, (_, i) => i), (i) =>
        runWithToken({ organizationId: "org", agentId: "agent", conversationId: `c-admission-${i}` }))
      const request = ({ runId, token }: { runId: number; token: string }) => ({
        path: "/worker/transcript/snapshot",
        init: {
          method: "POST",
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
          body: JSON.stringify({ runId, terminalStatus: "completed", snapshotJsonl: "x\n" })
        }
      })
      const result = yield* Effect.gen(function*() {
        const observing = yield* observer
        yield* holdingLock(observing, "lock table agent_transcript_snapshots in exclusive mode")
        // Four statements (the in-flight bound), each sent once the previous one waits on the lock.
        const sent: Array<Promise<ReadonlyArray<Fetched>>> = []
        for (let i = 0; i < 4; i++) {
          sent.push(sendAll(baseUrl, [request(uploads[i]!)]).answers)
          yield* eventually(`${i + 1} upload statements wait`, Effect.map(waitingStatements(observing, "agent_transcript_snapshots"), (n) => n === i + 1))
        }
        const queued = sendAll(baseUrl, [request(uploads[4]!)])
        yield* eventually("one upload queued", Effect.promise(async () =>
          /^runlane_snapshot_uploads_queued 1$/m.test(await (await fetch(`${baseUrl}/metrics`)).text())))
        const [refused] = yield* Effect.promise(() => sendAll(baseUrl, [request(uploads[5]!)]).answers)
        assert.strictEqual(refused!.status, 503, refused!.text)
        assert.strictEqual(refused!.retryAfter, "1")
        const [late] = yield* Effect.promise(() => queued.answers)
        assert.strictEqual(late!.status, 503, late!.text)
        assert.strictEqual(late!.retryAfter, "1")
        return sent
      }).pipe(Effect.scoped)
      const inFlight = yield* Effect.promise(() => Promise.all(result))
      assert.deepStrictEqual(inFlight.map(([answer]) => answer!.status), [200, 200, 200, 200])
      const [stored] = yield* Effect.promise(() =>
        sql<Array<{ n: number }>>`select count(*)::int as n from agent_transcript_snapshots where run_id in ${sql(uploads.map((u) => u.runId))}`)
      assert.strictEqual(stored!.n, 4)
    }))
})

describe("upload queue configuration", () => {
  layer(testServerLayer(), { excludeTestServices: true })("a bad value", (it) => {
    it.effect("stops TranscriptSnapshots.layer, naming the variable", () =>
      Effect.gen(function*() {
        const database = yield* Database
        for (const [variable, value] of [["RUNLANE_UPLOAD_QUEUE_MAX", "0"], ["RUNLANE_UPLOAD_QUEUE_MAX_BYTES", "lots"], ["RUNLANE_UPLOAD_QUEUE_TIMEOUT_MS", "-5"]]) {
          const error = yield* Layer.build(Layer.fresh(TranscriptSnapshots.layer)).pipe(
            Effect.provide(Layer.succeed(Database, database)),
            Effect.provide(ConfigProvider.layer(ConfigProvider.fromEnvRecord({ [variable!]: value! }))),
            Effect.scoped,
            Effect.flip
          )
          assert.strictEqual(error._tag, "UploadQueueConfigError")
          assert.strictEqual((error as { variable: string }).variable, variable)
          assert.include(error.message, variable!)
        }
      }))
  })
})
