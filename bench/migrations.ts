/**
 * Issue #11's figures: a schema change on a `runs` table of 1,000,000 rows while a writer sends runs
 * (RunsQueue.send) and a reader verifies them (RunOwnership.verify) without pause. The change adds a
 * nullable column, indexes it and fills it from action_input:
 * - safe: through the Migrator (ADD COLUMN in its own short transaction, CREATE INDEX CONCURRENTLY in a
 *   `-- runlane:no-transaction` file), then a keyset backfill (Backfills.runDefinition, 1000 rows a
 *   batch, no rate limit);
 * - naive (the baseline): one transaction with ADD COLUMN, a plain CREATE INDEX and one UPDATE.
 * Each side gets a freshly loaded table. Reported: the longest wait of any insert and any verify while
 * the change ran, the longest time the change held a lock on runs that blocks writers (sampled from
 * pg_locks every 5 ms), and the rows per second of the fill. RUNLANE_BENCH_MIGRATION_ROWS sets a smaller
 * table for a quick try (defaults to 1,000,000, the figure docs/migrations.md reports).
 */
import { cpSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { type BackfillDefinition, Backfills } from "../src/backfills/Backfills.ts"
import { Database } from "../src/db/Database.ts"
import { Migrator, migrationsFolder } from "../src/db/Migrator.ts"
import { RunOwnership } from "../src/ownership/RunOwnership.ts"
import { RunsQueue } from "../src/runs/RunsQueue.ts"
import { type BenchResult, now } from "./harness.ts"

const tableRows = Number(process.env["RUNLANE_BENCH_MIGRATION_ROWS"] ?? 1_000_000)

const scope = { organizationId: "org-bench", agentId: "agent-bench", conversationId: "conv-bench" }

/** The product's migrations plus the change, in a temporary folder the Migrator is pointed at. */
const safeChangeFolder = (): string => {
  const folder = mkdtempSync(join(tmpdir(), "runlane-bench-migrations-"))
  cpSync(migrationsFolder, folder, { recursive: true })
  const journalPath = join(folder, "meta", "_journal.json")
  const journal = JSON.parse(readFileSync(journalPath, "utf8")) as { entries: Array<Record<string, unknown>> }
  const last = journal.entries.at(-1)!
  const add = (offset: number, tag: string, sql: string) => {
    journal.entries.push({ ...last, idx: Number(last["idx"]) + offset, when: Number(last["when"]) + offset * 1000, tag })
    writeFileSync(join(folder, `${tag}.sql`), sql)
  }
  add(1, "9001_bench_channel_id", `ALTER TABLE "runs" ADD COLUMN "channel_id" text;`)
  add(2, "9002_bench_channel_id_index", [
    "-- runlane:no-transaction",
    `CREATE INDEX CONCURRENTLY IF NOT EXISTS "runs_channel_id_idx" ON "runs" ("channel_id");`
  ].join("\n"))
  writeFileSync(journalPath, JSON.stringify(journal, null, 2))
  return folder
}

const fillChannelId: BackfillDefinition = {
  name: "bench_channel_id",
  description: "runs.channel_id from action_input.channelId",
  needed: async () => true,
  remaining: async (sql, afterId) => {
    const [row] = await sql<Array<{ n: number }>>`select count(*)::float8 as n from runs where id > ${afterId}`
    return row?.n ?? 0
  },
  batch: async (tx, afterId, limit) => {
    const [row] = await tx<Array<{ last_id: string | null; looked: number }>>`
      with batch as (
        select id from runs where id > ${afterId} order by id limit ${limit} for no key update
      ), updated as (
        update runs r set channel_id = r.action_input->>'channelId' from batch where r.id = batch.id
        returning r.id
      )
      select max(id)::text as last_id, count(*)::int as looked from updated`
    const looked = row?.looked ?? 0
    return { lastId: looked === 0 ? afterId : Number(row!.last_id), looked, changed: looked }
  }
}

interface Figures {
  readonly insertMaxMs: number
  readonly verifyMaxMs: number
  readonly blockingLockMaxMs: number
  readonly fillRowsPerSecond: number
  readonly changeMs: number
  readonly inserts: number
}

const writerBlockingModes = ["ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"]

/** Loads the table, then runs `change` while the writer, reader and lock sampler run; answers the figures. */
const measure = (url: string, change: (url: string) => Promise<number>) =>
  Effect.gen(function*() {
    const database = yield* Database
    const queue = yield* RunsQueue
    const ownership = yield* RunOwnership
    const admin = yield* Effect.acquireRelease(
      Effect.sync(() => postgres(url, { max: 1, onnotice: () => {} })),
      (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
    )
    yield* Effect.promise(async () => {
      await admin`alter table runs drop column if exists channel_id`
      await admin`drop index if exists runs_channel_id_idx`
      await admin`truncate runs cascade`
      await admin`
        insert into runs (organization_id, agent_id, conversation_id, queue, status, action_input, legacy_scope,
                          completed_at)
        select 'org-' || (g % 1000), 'agent-' || (g % 50), 'conv-' || g, 'messages', 'completed',
               jsonb_build_object('channelId', 'channel-' || (g % 5000), 'messageText', 'hello there', 'runNo', g),
               false, now()
          from generate_series(1, ${tableRows}) g`
      await admin`vacuum analyze runs`
    })
    const { id: ownRun } = yield* queue.send({ queue: "messages", ...scope, payload: { channelId: "c" } })
    let stop = false
    let insertMaxMs = 0
    let verifyMaxMs = 0
    let inserts = 0
    const writer = (async () => {
      while (!stop) {
        const start = now()
        await Effect.runPromise(queue.send({ queue: "messages", ...scope, payload: { channelId: "channel-1" } }))
        insertMaxMs = Math.max(insertMaxMs, now() - start)
        inserts++
      }
    })()
    const reader = (async () => {
      while (!stop) {
        const start = now()
        await Effect.runPromise(ownership.verify(ownRun, scope))
        verifyMaxMs = Math.max(verifyMaxMs, now() - start)
      }
    })()
    let blockingSince: number | undefined
    let blockingLockMaxMs = 0
    const sampler = (async () => {
      while (!stop) {
        // Locks of the change's sessions only: neither the writer's and reader's pool nor this sampler.
        const [row] = await admin<Array<{ held: boolean }>>`
          select exists (
            select 1 from pg_locks l join pg_stat_activity a on a.pid = l.pid
             where l.relation = 'runs'::regclass and l.granted and l.mode in ${admin(writerBlockingModes)}
               and a.application_name <> ${database.applicationName ?? ""} and l.pid <> pg_backend_pid()
          ) as held`
        const held = row!.held
        const at = now()
        if (held && blockingSince === undefined) blockingSince = at
        if (!held && blockingSince !== undefined) {
          blockingLockMaxMs = Math.max(blockingLockMaxMs, at - blockingSince)
          blockingSince = undefined
        }
        await new Promise((resolve) => setTimeout(resolve, 5))
      }
    })()
    const started = now()
    const fillRowsPerSecond = yield* Effect.promise(() => change(url))
    const changeMs = now() - started
    stop = true
    yield* Effect.promise(() => Promise.all([writer, reader, sampler]))
    return { insertMaxMs, verifyMaxMs, blockingLockMaxMs, fillRowsPerSecond, changeMs, inserts } satisfies Figures
  }).pipe(Effect.scoped)

const safeChange = (folder: string) => (url: string) =>
  Effect.runPromise(Effect.gen(function*() {
    yield* (yield* Migrator).migrate
    const started = now()
    const report = yield* (yield* Backfills).runDefinition(fillChannelId, { rowsPerSecond: 0 })
    return (report.done * 1000) / (now() - started)
  }).pipe(Effect.provide(Layer.mergeAll(Migrator.layerWith({ folder }), Backfills.layer).pipe(
    Layer.provide(Database.layerWith({ url: Redacted.make(url), poolMax: 2 }))
  ))))

const naiveChange = async (url: string): Promise<number> => {
  const sql = postgres(url, { max: 1, onnotice: () => {}, connection: { application_name: "bench naive change" } })
  try {
    let rows = 0
    let fillMs = 0
    await sql.begin(async (tx) => {
      await tx`alter table runs add column channel_id text`
      await tx`create index runs_channel_id_idx on runs (channel_id)`
      const started = now()
      rows = (await tx`update runs set channel_id = action_input->>'channelId'`).count
      fillMs = now() - started
    })
    return (rows * 1000) / fillMs
  } finally {
    await sql.end({ timeout: 5 })
  }
}

export const migrationBenchmarks = (url: string): Effect.Effect<ReadonlyArray<BenchResult>, unknown> =>
  Effect.gen(function*() {
    const safe = yield* measure(url, safeChange(safeChangeFolder()))
    // measure() drops the safe side's column and index and reloads the table first.
    const naive = yield* measure(url, naiveChange)
    const rows = tableRows.toLocaleString("en")
    const lower = (name: string, value: number, baseline: number, note: string): BenchResult =>
      ({ name, value, baseline, unit: "ms", ratio: baseline / Math.max(value, 0.001), note })
    return [
      lower(`change on ${rows} runs: longest insert wait`, safe.insertMaxMs, naive.insertMaxMs, "target < 1000 ms; baseline: one transaction"),
      lower(`change on ${rows} runs: longest verify wait`, safe.verifyMaxMs, naive.verifyMaxMs, "target < 1000 ms"),
      lower(`change on ${rows} runs: longest writer-blocking lock`, safe.blockingLockMaxMs, naive.blockingLockMaxMs, "sampled every 5 ms"),
      lower(`change on ${rows} runs: whole change`, safe.changeMs, naive.changeMs, `inserts during it: ${safe.inserts} vs ${naive.inserts}`),
      {
        name: `change on ${rows} runs: fill rows/s`,
        value: safe.fillRowsPerSecond,
        baseline: naive.fillRowsPerSecond,
        unit: "rows/s",
        ratio: safe.fillRowsPerSecond / naive.fillRowsPerSecond,
        note: "keyset batches of 1000 vs one UPDATE"
      }
    ]
  }).pipe(
    Effect.provide(Layer.mergeAll(RunsQueue.layer, RunOwnership.layer).pipe(
      Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 4 }))
    ))
  )
