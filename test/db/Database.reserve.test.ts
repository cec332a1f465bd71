import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { expectQuiescent, LockHarness, lockHarnessLayer } from "../support/lockHarness.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

layer(testDatabaseLayer({ poolMax: 2 }), { excludeTestServices: true })("Database.reserve", (it) => {
  it.effect("pins a connection for the life of the scope and gives it back when the scope closes", () =>
    Effect.gen(function*() {
      const database = yield* Database
      const pid = yield* Effect.scoped(Effect.gen(function*() {
        const pinned = yield* database.reserve(1_000)
        const [row] = yield* Effect.promise(() => pinned.query((sql) => sql<Array<{ pid: number }>>`select pg_backend_pid() as pid`))
        assert.strictEqual(row!.pid, pinned.pid)
        // The other pool connection serves the pool meanwhile.
        const [other] = yield* Effect.promise(() => database.sql<Array<{ pid: number }>>`select pg_backend_pid() as pid`)
        assert.notStrictEqual(other!.pid, pinned.pid)
        return pinned.pid
      }))
      // Both connections are back: two concurrent queries run on two sessions, one of them the pinned one.
      const pids = yield* Effect.promise(() =>
        Promise.all([0, 1].map(() => database.sql<Array<{ pid: number }>>`select pg_backend_pid() as pid from pg_sleep(0.05)`))
      )
      assert.include(pids.map((rows) => rows[0]!.pid), pid)
    }))

  it.effect("answers PoolExhausted when no connection comes within the timeout", () =>
    Effect.gen(function*() {
      const database = yield* Database
      const error = yield* Effect.scoped(Effect.gen(function*() {
        yield* database.reserve(1_000)
        yield* database.reserve(1_000)
        return yield* Effect.flip(database.reserve(100))
      }))
      assert.deepInclude(error, { _tag: "PoolExhausted", timeoutMs: 100, poolMax: 2 })
    }))
})

layer(lockHarnessLayer({ poolMax: 2, cap: 1 }), { excludeTestServices: true })("Database.reserve with faults", (it) => {
  it.effect("a pinned session whose first query never answers fails the reserve within its bound and is ended", () =>
    Effect.gen(function*() {
      const database = yield* Database
      const harness = yield* LockHarness
      harness.clearFaults()
      harness.faults.firstQuery.push("hang")
      const error = yield* Effect.flip(Effect.scoped(database.reserve(300)))
      assert.strictEqual(error._tag, "DatabaseError")
      assert.deepStrictEqual(harness.faults.fired, ["firstQuery:hang"])
      yield* expectQuiescent
    }))
})
