/**
 * Session advisory locks behind a real PgBouncer (conversation locks and the migration lock):
 * transaction mode is refused at start, naming the cause and the fix; session mode serves.
 */
import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Effect, Exit, Layer, Redacted } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { Migrator } from "../../src/db/Migrator.ts"
import { ConversationLocks, SessionPoolingRequired } from "../../src/locks/ConversationLocks.ts"
import { conversationLockHash, defaultLockNamespace } from "../../src/locks/lockKey.ts"
import { startPgbouncer } from "../support/pgbouncer.ts"
import { acquireTestDatabase, createDatabase, dropDatabase } from "../support/testDatabase.ts"

const locksThrough = (url: string) =>
  ConversationLocks.layer.pipe(
    Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 6 })),
    Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_MAX_RESERVED_LOCKS: "3" })))
  )

describe("ConversationLocks behind PgBouncer", () => {
  it.live("transaction mode: the layer refuses to start, naming the cause and the fix", () =>
    Effect.gen(function*() {
      const database = yield* acquireTestDatabase
      const url = yield* startPgbouncer(database.url, "transaction")
      const exit = yield* Effect.exit(Effect.scoped(Layer.build(locksThrough(url))))
      assert.isTrue(Exit.isFailure(exit), "the layer must not start")
      const failure = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail") : undefined
      const error = (failure as { error: unknown } | undefined)?.error
      assert.instanceOf(error, SessionPoolingRequired)
      assert.include((error as SessionPoolingRequired).message, "transaction pooler")
      assert.include((error as SessionPoolingRequired).message, "pool_mode = session")
    }).pipe(Effect.scoped), { timeout: 60_000 })

  it.live("session mode: locks are served, each on its own server session", () =>
    Effect.gen(function*() {
      const database = yield* acquireTestDatabase
      const url = yield* startPgbouncer(database.url, "session")
      const key = { organizationId: "org", agentId: "agent", conversationId: "through-pgbouncer" }
      const admin = yield* Effect.acquireRelease(
        Effect.sync(() => postgres(database.url, { max: 1, onnotice: () => {} })),
        (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
      )
      yield* Effect.scoped(Effect.gen(function*() {
        const locks = yield* ConversationLocks
        const lock = yield* locks.acquire(key)
        const holders = yield* Effect.promise(() =>
          admin<Array<{ pid: number }>>`
            select pid from pg_locks where locktype = 'advisory' and granted and objsubid = 2
               and classid = ${String(defaultLockNamespace >>> 0)}::oid and objid = ${String(conversationLockHash(key) >>> 0)}::oid`)
        assert.deepStrictEqual(holders.map((row) => row.pid), [lock.backendPid])
        assert.strictEqual((yield* Effect.flip(Effect.scoped(locks.acquire(key))))._tag, "ConversationBusy")
      }).pipe(Effect.provide(locksThrough(url))))
    }).pipe(Effect.scoped), { timeout: 60_000 })

  it.live("transaction mode: the Migrator refuses before it takes the migration lock; session mode migrates", () =>
    Effect.acquireUseRelease(
      Effect.promise(() => createDatabase({ migrated: false })),
      (database) =>
        Effect.gen(function*() {
          const migrate = (url: string) =>
            Effect.flatMap(Migrator, (migrator) => migrator.migrate).pipe(
              Effect.provide(Migrator.layer.pipe(Layer.provide(Database.layerWith({ url: Redacted.make(url), poolMax: 2 }))))
            )
          const transactionMode = yield* startPgbouncer(database.url, "transaction")
          const error = yield* Effect.flip(migrate(transactionMode))
          assert.instanceOf(error, SessionPoolingRequired)
          assert.include((error as SessionPoolingRequired).message, "migrations need one server session")
          const sessionMode = yield* startPgbouncer(database.url, "session")
          const report = yield* migrate(sessionMode)
          assert.isAbove(report.appliedNow.length, 0)
          assert.deepStrictEqual(report.status.pending, [])
        }).pipe(Effect.scoped),
      (database) => Effect.promise(() => dropDatabase(database.name))
    ), { timeout: 120_000 })
})
