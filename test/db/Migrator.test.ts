import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { compareJournal, MigrationError, Migrator, readJournal } from "../../src/db/Migrator.ts"
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
