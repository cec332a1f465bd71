/**
 * 50 fibers over 10 keys with the default cap of a 20-connection pool: every hold is recorded by the
 * database (clock_timestamp() just after the lock is granted and just before it is released), and the
 * database then confirms that no two holds of one key ever overlapped.
 */
import { assert, layer } from "@effect/vitest"
import { Effect, Layer, References } from "effect"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { expectQuiescent, lockHarnessLayer } from "../support/lockHarness.ts"

const fibers = 50
const keyCount = 10
const holdsPerFiber = 4

const TestLayer = lockHarnessLayer({ poolMax: 20, reserveTimeoutMs: 5_000 }).pipe(
  Layer.provideMerge(Layer.succeed(References.MinimumLogLevel, "Error"))
)

layer(TestLayer, { excludeTestServices: true })("ConversationLocks under contention", (it) => {
  it.effect(`${fibers} fibers over ${keyCount} keys never overlap on a key, by the database's clock`, () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const { use } = yield* Database
      yield* use("test", (sql) =>
        sql`create table lock_audit (id serial primary key, key int not null, started timestamptz not null, ended timestamptz)`)
      const outcomes = { held: 0, busy: 0, capReached: 0 }

      const holdOnce = (fiber: number, attempt: number) => {
        const key = (fiber * 7 + attempt * 3) % keyCount
        return Effect.scoped(Effect.gen(function*() {
          yield* locks.acquire({ organizationId: "org", agentId: "agent", conversationId: `k${key}` })
          const [row] = yield* use("test.audit", (sql) =>
            sql<Array<{ id: number }>>`insert into lock_audit (key, started) values (${key}, clock_timestamp()) returning id`)
          yield* Effect.sleep(1 + (attempt % 3))
          yield* use("test.audit", (sql) => sql`update lock_audit set ended = clock_timestamp() where id = ${row!.id}`)
          outcomes.held++
          return true
        })).pipe(
          Effect.catchTag("ConversationBusy", () => Effect.sync(() => (outcomes.busy++, false))),
          Effect.catchTag("LockCapReached", () => Effect.sync(() => (outcomes.capReached++, false)))
        )
      }

      const worker = (fiber: number) =>
        Effect.gen(function*() {
          let done = 0
          for (let attempt = 0; done < holdsPerFiber; attempt++) {
            if (attempt > 2_000) return yield* Effect.die(new Error(`fiber ${fiber} starved`))
            if (yield* holdOnce(fiber, attempt)) done++
            else yield* Effect.sleep(1)
          }
        })

      yield* Effect.all(Array.from({ length: fibers }, (_, fiber) => worker(fiber)), { concurrency: "unbounded" })

      const [overlaps] = yield* use("test", (sql) =>
        sql<Array<{ n: number }>>`
          select count(*)::int as n from lock_audit a join lock_audit b
            on a.key = b.key and a.id < b.id and a.started < b.ended and b.started < a.ended`)
      const [total] = yield* use("test", (sql) =>
        sql<Array<{ n: number; open: number }>>`select count(*)::int as n, count(*) filter (where ended is null)::int as open from lock_audit`)
      assert.strictEqual(overlaps!.n, 0, "two holds of one key overlapped")
      assert.strictEqual(total!.n, fibers * holdsPerFiber)
      assert.strictEqual(total!.open, 0)
      assert.strictEqual(outcomes.held, fibers * holdsPerFiber)
      // The workload really contended: keys were found busy and the cap was reached.
      assert.isAbove(outcomes.busy, 0)
      assert.isAbove(outcomes.capReached, 0)
      yield* expectQuiescent
    }), { timeout: 120_000 })
})
