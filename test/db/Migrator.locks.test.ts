/**
 * The Migrator against other sessions' locks: a DDL statement that meets a held lock gives way under
 * lock_timeout and tries again a bounded number of times; a migrator waits a bounded time for another
 * migrator's lock and names the holder; a concurrent index build killed half way is rebuilt, never kept.
 */
import { assert, describe, it } from "@effect/vitest"
import { spawn } from "node:child_process"
import { Effect, Exit, Fiber } from "effect"
import postgres from "postgres"
import { migrationLockKey } from "../../src/db/Migrator.ts"
import { eventually } from "../support/lockHarness.ts"
import { fixtureFolder, migrateOnce, migratorWaiting, type WaitingBackend, withEmptyDatabase } from "../support/migrationHarness.ts"
import { projectRoot } from "../support/serviceProcess.ts"

const columnExists = (client: postgres.Sql) =>
  Effect.map(
    Effect.promise(() => client`select count(*)::int as n from information_schema.columns where table_name = 't' and column_name = 'c'`),
    (rows) => rows[0]!["n"] === 1
  )

describe("Migrator lock timeouts", () => {
  it.live("a DDL statement blocked by an ACCESS SHARE lock gives way, tries again, and succeeds once the lock is gone", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        yield* migrateOnce(db.url, { folder: fixtureFolder("lock-first") })
        yield* Effect.promise(() => client`begin`)
        yield* Effect.promise(() => client`lock table t in access share mode`)
        const migration = yield* Effect.forkChild(
          migrateOnce(db.url, { folder: fixtureFolder("lock"), lockTimeoutMs: 200, attempts: 50, retryDelayMs: 50 })
        )
        // Two different statement starts of the waiting ALTER: it timed out and was tried again.
        const seen = new Set<string>()
        yield* eventually("the ALTER waited, gave way and waited again", Effect.map(migratorWaiting(client, "ALTER TABLE"), (waiting?: WaitingBackend) => {
          if (waiting !== undefined) seen.add(waiting.queryStart)
          return seen.size >= 2
        }), 15_000)
        assert.isFalse(yield* columnExists(client))
        yield* Effect.promise(() => client`rollback`)
        const report = yield* Fiber.join(migration)
        assert.deepStrictEqual(report.appliedNow, ["0001_t_column"])
        assert.isTrue(yield* columnExists(client))
      })))

  it.live("gives up after the configured tries, names the migration and leaves it unapplied", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        yield* migrateOnce(db.url, { folder: fixtureFolder("lock-first") })
        yield* Effect.promise(() => client`begin`)
        yield* Effect.promise(() => client`lock table t in access share mode`)
        const error = yield* Effect.flip(
          migrateOnce(db.url, { folder: fixtureFolder("lock"), lockTimeoutMs: 100, attempts: 3, retryDelayMs: 20 })
        )
        yield* Effect.promise(() => client`rollback`)
        assert.strictEqual(error._tag, "MigrationError")
        if (error._tag !== "MigrationError") return
        assert.strictEqual(error.migration, "0001_t_column")
        assert.include(error.message, "after 3 tries")
        assert.isFalse(yield* columnExists(client))
        const ledger = yield* Effect.promise(() => client`select count(*)::int as n from drizzle.__drizzle_migrations`)
        assert.strictEqual(ledger[0]!["n"], 1)
      })))

  it.live("a migrator waits a bounded time for the migration lock and names the session holding it", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        const [holder] = yield* Effect.promise(() =>
          client<Array<{ pid: number }>>`
            select pg_backend_pid() as pid, pg_advisory_lock(${migrationLockKey[0]}::int4, ${migrationLockKey[1]}::int4)`)
        const error = yield* Effect.flip(migrateOnce(db.url, { folder: fixtureFolder("lock"), lockWaitMs: 300 }))
        assert.strictEqual(error._tag, "MigrationLockBusy")
        if (error._tag !== "MigrationLockBusy") return
        assert.isAtLeast(error.waitedMs, 300)
        assert.include(error.holder, `pid ${holder!.pid}`)
        assert.include(error.holder, `application "migration test"`)
        yield* Effect.promise(() => client`select pg_advisory_unlock_all()`)
        const report = yield* migrateOnce(db.url, { folder: fixtureFolder("lock") })
        assert.deepStrictEqual(report.appliedNow, ["0000_t", "0001_t_column"])
      })))
})

describe("Migrator with an interrupted concurrent index build", () => {
  it.live("the index left INVALID is detected, dropped and built again; the migration is recorded once", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        yield* migrateOnce(db.url, { folder: fixtureFolder("mixed-first") })
        // An open writer: CREATE INDEX CONCURRENTLY registers the index (invalid), then waits for it.
        yield* Effect.promise(() => client`begin`)
        yield* Effect.promise(() => client`insert into items (n) values (1)`)
        const migration = yield* Effect.forkChild(
          migrateOnce(db.url, { folder: fixtureFolder("mixed"), lockTimeoutMs: 60_000 })
        )
        let waiting: WaitingBackend | undefined
        yield* eventually("the concurrent build waits for the open writer", Effect.map(
          migratorWaiting(client, "CREATE INDEX CONCURRENTLY"),
          (found) => (waiting = found) !== undefined
        ), 15_000)
        const before = yield* Effect.promise(() =>
          client<Array<{ valid: boolean }>>`select indisvalid as valid from pg_index where indexrelid = to_regclass('items_n_idx')`)
        assert.deepStrictEqual(before, [{ valid: false }])
        yield* Effect.promise(() => client`select pg_terminate_backend(${waiting!.pid})`)
        const killed = yield* Fiber.await(migration)
        assert.isTrue(Exit.isFailure(killed))
        yield* Effect.promise(() => client`commit`)
        const still = yield* Effect.promise(() =>
          client<Array<{ valid: boolean }>>`select indisvalid as valid from pg_index where indexrelid = to_regclass('items_n_idx')`)
        assert.deepStrictEqual(still, [{ valid: false }])

        const report = yield* migrateOnce(db.url, { folder: fixtureFolder("mixed") })
        assert.deepStrictEqual(report.appliedNow, ["0001_items_index", "0002_items_note"])
        const after = yield* Effect.promise(() =>
          client<Array<{ valid: boolean }>>`
            select i.indisvalid as valid from pg_index i join pg_class c on c.oid = i.indexrelid where c.relname like 'items_n_idx%'`)
        assert.deepStrictEqual(after, [{ valid: true }])
        const ledger = yield* Effect.promise(() => client`select count(*)::int as n from drizzle.__drizzle_migrations`)
        assert.strictEqual(ledger[0]!["n"], 3)
      })))
})

/** Runs test/support/migrateProcess.ts as its own OS process; resolves with its exit code and output. */
const migrateInProcess = (url: string, folder: string) =>
  Effect.promise(() =>
    new Promise<{ code: number | null; output: string }>((resolve) => {
      const child = spawn(process.execPath, ["--import", "tsx", "test/support/migrateProcess.ts", url, folder], {
        cwd: projectRoot,
        stdio: ["ignore", "pipe", "pipe"]
      })
      let output = ""
      child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")))
      child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")))
      child.once("exit", (code) => resolve({ code, output }))
    }))

describe("Migrators in separate processes", () => {
  it.live("two OS processes migrating one database at once apply each migration exactly once", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        const results = yield* Effect.all(
          [migrateInProcess(db.url, fixtureFolder("mixed")), migrateInProcess(db.url, fixtureFolder("mixed"))],
          { concurrency: "unbounded" }
        )
        for (const result of results) assert.strictEqual(result.code, 0, result.output)
        const applied = results.flatMap((result) => (JSON.parse(result.output.trim().split("\n").at(-1)!) as { appliedNow: Array<string> }).appliedNow)
        assert.deepStrictEqual(applied.sort(), ["0000_items", "0001_items_index", "0002_items_note"])
        const log = yield* Effect.promise(() =>
          client<Array<{ tag: string; n: number }>>`select tag, count(*)::int as n from migration_log group by tag order by tag`)
        assert.deepStrictEqual(log, [
          { tag: "0000_items", n: 2 },
          { tag: "0001_items_index", n: 2 },
          { tag: "0002_items_note", n: 2 }
        ])
      })), 60_000)
})
