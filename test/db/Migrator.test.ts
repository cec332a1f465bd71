import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { compareJournal, MigrationError, Migrator, readJournal } from "../../src/db/Migrator.ts"
import { concurrentIndexName, parseMigration } from "../../src/db/migrationFiles.ts"
import { fixtureFolder, migrateOnce, withEmptyDatabase } from "../support/migrationHarness.ts"
import { createDatabase, dropDatabase } from "../support/testDatabase.ts"

const journal = readJournal()

/** A Migrator with its own pool, as a separate process would have. */
const migratorFor = (url: string) =>
  Migrator.layer.pipe(Layer.provide(Database.layerWith({ url: Redacted.make(url), poolMax: 2 })))

const migrateWith = (url: string) =>
  Effect.gen(function*() {
    const migrator = yield* Migrator
    return yield* migrator.migrate
  }).pipe(Effect.provide(migratorFor(url)))

describe("Migrator", () => {
  it.live("four migrators at once on an empty database all succeed and apply each migration once", () =>
    Effect.acquireUseRelease(
      Effect.promise(() => createDatabase({ migrated: false })),
      (db) =>
        Effect.gen(function*() {
          const reports = yield* Effect.all(Array.from({ length: 4 }, () => migrateWith(db.url)), {
            concurrency: "unbounded"
          })
          const appliedNow = reports.flatMap((report) => report.appliedNow)
          assert.deepStrictEqual(appliedNow, journal.map((entry) => entry.tag))
          for (const report of reports) {
            assert.deepStrictEqual(report.status.pending, [])
            assert.deepStrictEqual(report.status.applied, journal.map((entry) => entry.tag))
          }
          const client = postgres(db.url, { max: 1, onnotice: () => {} })
          const ledger = yield* Effect.promise(() => client`select hash from drizzle.__drizzle_migrations`)
          const locks = yield* Effect.promise(() =>
            client`select count(*)::int as n from pg_locks where locktype = 'advisory'`)
          yield* Effect.promise(() => client.end())
          assert.strictEqual(ledger.length, journal.length)
          assert.strictEqual(locks[0]!["n"], 0)
        }),
      (db) => Effect.promise(() => dropDatabase(db.name))
    ))

  it.live("status lists every migration as pending on an empty database, none after migrating", () =>
    Effect.acquireUseRelease(
      Effect.promise(() => createDatabase({ migrated: false })),
      (db) =>
        Effect.gen(function*() {
          const migrator = yield* Migrator
          const before = yield* migrator.status
          assert.deepStrictEqual(before.pending, journal.map((entry) => entry.tag))
          yield* migrator.migrate
          const after = yield* migrator.status
          assert.deepStrictEqual(after.pending, [])
        }).pipe(Effect.provide(migratorFor(db.url))),
      (db) => Effect.promise(() => dropDatabase(db.name))
    ))
})

describe("Migrator with mixed migrations", () => {
  it.live("applies them in journal order, each ordinary one in one transaction, the marked one outside any", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        const report = yield* migrateOnce(db.url, { folder: fixtureFolder("mixed") })
        assert.deepStrictEqual(report.appliedNow, ["0000_items", "0001_items_index", "0002_items_note"])
        const log = yield* Effect.promise(() =>
          client<Array<{ tag: string; xid: string }>>`select tag, xid::text from migration_log order by seq`)
        assert.deepStrictEqual(log.map((row) => row.tag), [
          "0000_items", "0000_items", "0001_items_index", "0001_items_index", "0002_items_note", "0002_items_note"
        ])
        // Statements of one transactional migration share a transaction; a marked file's do not.
        assert.strictEqual(log[0]!.xid, log[1]!.xid)
        assert.notStrictEqual(log[2]!.xid, log[3]!.xid)
        assert.strictEqual(log[4]!.xid, log[5]!.xid)
        assert.notStrictEqual(log[1]!.xid, log[4]!.xid)
        const [index] = yield* Effect.promise(() =>
          client<Array<{ valid: boolean }>>`select indisvalid as valid from pg_index where indexrelid = 'items_n_idx'::regclass`)
        assert.isTrue(index!.valid)
        const again = yield* migrateOnce(db.url, { folder: fixtureFolder("mixed") })
        assert.deepStrictEqual(again.appliedNow, [])
      })))

  it.live("a migration that fails is not recorded, and those before it stay applied", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        yield* migrateOnce(db.url, { folder: fixtureFolder("mixed-first") })
        // A column 0002 adds, made to exist already, fails 0002 after 0001 was applied and recorded.
        yield* Effect.promise(() => client`alter table items add column note text`)
        const error = yield* Effect.flip(migrateOnce(db.url, { folder: fixtureFolder("mixed") }))
        assert.strictEqual(error._tag, "DatabaseError")
        const ledger = yield* Effect.promise(() => client`select created_at::text from drizzle.__drizzle_migrations order by created_at`)
        assert.deepStrictEqual(ledger.map((row) => row["created_at"]), ["1800000000000", "1800000001000"])
        const notes = yield* Effect.promise(() =>
          client`select count(*)::int as n from migration_log where tag = '0002_items_note'`)
        assert.strictEqual(notes[0]!["n"], 0)
      })))
})

describe("Migrator with a constraint added NOT VALID and validated outside a transaction", () => {
  it.live("validates it and drops an index concurrently in a marked file, once", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        const report = yield* migrateOnce(db.url, { folder: fixtureFolder("constraint") })
        assert.deepStrictEqual(report.appliedNow, ["0000_items", "0001_items_check", "0002_items_validate"])
        const [constraint] = yield* Effect.promise(() =>
          client<Array<{ validated: boolean }>>`select convalidated as validated from pg_constraint where conname = 'items_n_positive'`)
        assert.isTrue(constraint!.validated)
        const [index] = yield* Effect.promise(() => client<Array<{ gone: boolean }>>`select to_regclass('items_n_idx') is null as gone`)
        assert.isTrue(index!.gone)
        assert.deepStrictEqual((yield* migrateOnce(db.url, { folder: fixtureFolder("constraint") })).appliedNow, [])
      })))

  it.live("a row that breaks the constraint fails the validation, and the marked migration is not recorded", () =>
    withEmptyDatabase((db, client) =>
      Effect.gen(function*() {
        yield* migrateOnce(db.url, { folder: fixtureFolder("constraint-first") })
        // Written before the constraint exists; NOT VALID leaves it there, VALIDATE finds it.
        yield* Effect.promise(() => client`insert into items (n) values (0)`)
        const error = yield* Effect.flip(migrateOnce(db.url, { folder: fixtureFolder("constraint") }))
        assert.deepInclude(error, { _tag: "DatabaseError", sqlState: "23514" })
        const ledger = yield* Effect.promise(() => client`select created_at::text from drizzle.__drizzle_migrations order by created_at`)
        assert.deepStrictEqual(ledger.map((row) => row["created_at"]), ["1800000000000", "1800000001000"])
        const [constraint] = yield* Effect.promise(() =>
          client<Array<{ validated: boolean }>>`select convalidated as validated from pg_constraint where conname = 'items_n_positive'`)
        assert.isFalse(constraint!.validated)
      })))
})

describe("parseMigration", () => {
  it("a file with the marker line runs outside a transaction; statements split at drizzle's breakpoints", () => {
    const parsed = parseMigration("0001_x", [
      "-- Custom SQL migration file, put your code below! --",
      "-- runlane:no-transaction",
      "CREATE INDEX CONCURRENTLY IF NOT EXISTS x ON t (a);",
      "--> statement-breakpoint",
      "  -- only a comment",
      "--> statement-breakpoint",
      "DROP INDEX CONCURRENTLY IF EXISTS y;"
    ].join("\n"))
    assert.deepStrictEqual(parsed, {
      transactional: false,
      statements: [
        "-- Custom SQL migration file, put your code below! --\n-- runlane:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS x ON t (a);",
        "DROP INDEX CONCURRENTLY IF EXISTS y;"
      ]
    })
    assert.deepStrictEqual(parseMigration("0000_y", "CREATE TABLE t (a int);"), {
      transactional: true,
      statements: ["CREATE TABLE t (a int);"]
    })
  })

  it("refuses a misspelt directive instead of running the file in a transaction", () => {
    const result = parseMigration("0003_z", "-- runlane:no-transactions\nCREATE INDEX CONCURRENTLY x ON t (a);")
    assert.instanceOf(result, MigrationError)
    assert.strictEqual((result as MigrationError).migration, "0003_z")
    assert.include((result as MigrationError).message, "runlane:no-transactions")
  })

  it("names the index a concurrent build creates, quoted or not, and nothing else", () => {
    assert.strictEqual(concurrentIndexName(`CREATE INDEX CONCURRENTLY IF NOT EXISTS "runs_x" ON "runs" ("id")`), `"runs_x"`)
    assert.strictEqual(concurrentIndexName("-- why\ncreate unique index concurrently public.ix on t (a)"), "public.ix")
    assert.strictEqual(concurrentIndexName("CREATE INDEX ix ON t (a)"), undefined)
    assert.strictEqual(concurrentIndexName("DROP INDEX CONCURRENTLY IF EXISTS ix"), undefined)
  })
})

describe("compareJournal", () => {
  const entries = [
    { tag: "0000_a", when: 100, hash: "h0" },
    { tag: "0001_b", when: 200, hash: "h1" },
    { tag: "0002_c", when: 300, hash: "h2" }
  ]

  it("splits applied from pending by the newest applied migration", () => {
    assert.deepStrictEqual(compareJournal(entries, [{ hash: "h0", created_at: "100" }]), {
      applied: ["0000_a"],
      pending: ["0001_b", "0002_c"]
    })
  })

  it("refuses a back-dated migration that drizzle would skip silently", () => {
    const result = compareJournal(entries, [{ hash: "h0", created_at: "100" }, { hash: "h2", created_at: "300" }])
    assert.instanceOf(result, MigrationError)
    assert.strictEqual((result as MigrationError).migration, "0001_b")
  })

  it("refuses a migration edited after it was applied", () => {
    const result = compareJournal(entries, [{ hash: "changed", created_at: "100" }])
    assert.instanceOf(result, MigrationError)
    assert.strictEqual((result as MigrationError).migration, "0000_a")
    assert.include((result as MigrationError).message, "edited")
  })

  it("refuses a journal whose entries are not in time order", () => {
    const result = compareJournal([entries[0]!, entries[2]!, entries[1]!], [])
    assert.instanceOf(result, MigrationError)
    assert.strictEqual((result as MigrationError).migration, "0001_b")
  })
})
