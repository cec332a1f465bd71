import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Effect, Exit, Fiber, Layer, Logger, Redacted, Scope } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks, LockConfigError, SessionPoolingRequired } from "../../src/locks/ConversationLocks.ts"
import { createDatabase, dropDatabase } from "../support/testDatabase.ts"

const key = (n: number) => ({ organizationId: "org", agentId: "agent", conversationId: `c-${n}` })

/** Builds ConversationLocks.layer from `env` over a fresh database with a pool of `poolMax`. */
const withLocksFromEnv = <A, E>(
  poolMax: number,
  env: Record<string, string>,
  body: (locks: ConversationLocks["Service"]) => Effect.Effect<A, E, Scope.Scope>
) =>
  Effect.acquireUseRelease(
    Effect.promise(() => createDatabase({ migrated: true })),
    (db) =>
      Effect.scoped(Effect.gen(function*() {
        const locks = yield* ConversationLocks
        return yield* body(locks)
      })).pipe(
        Effect.provide(ConversationLocks.layer.pipe(
          Layer.provide(Database.layerWith({ url: Redacted.make(db.url), poolMax })),
          Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown(env)))
        ))
      ),
    (db) => Effect.promise(() => dropDatabase(db.name))
  )

describe("ConversationLocks configuration", () => {
  it.live("the default cap is DB_POOL_MAX - 5, exactly", () =>
    withLocksFromEnv(8, {}, (locks) =>
      Effect.gen(function*() {
        for (let n = 0; n < 3; n++) yield* locks.acquire(key(n))
        const error = yield* Effect.flip(Effect.scoped(locks.acquire(key(3))))
        assert.deepInclude(error, { _tag: "LockCapReached", count: 3, cap: 3 })
      })))

  it.live("cap 1 admits one lock, and the next after it is released", () =>
    withLocksFromEnv(4, { RUNLANE_MAX_RESERVED_LOCKS: "1" }, (locks) =>
      Effect.gen(function*() {
        const scope = yield* Scope.make()
        yield* locks.acquire(key(0)).pipe(Scope.provide(scope))
        assert.deepInclude(yield* Effect.flip(Effect.scoped(locks.acquire(key(1)))), { _tag: "LockCapReached", count: 1, cap: 1 })
        yield* Scope.close(scope, Exit.void)
        yield* Effect.scoped(locks.acquire(key(1)))
      })))

  it.live("RUNLANE_MAX_RESERVED_LOCKS=0 drains: every acquire fails LockCapReached", () =>
    withLocksFromEnv(4, { RUNLANE_MAX_RESERVED_LOCKS: "0" }, (locks) =>
      Effect.gen(function*() {
        for (let n = 0; n < 3; n++) {
          assert.deepInclude(yield* Effect.flip(Effect.scoped(locks.acquire(key(n)))), { _tag: "LockCapReached", count: 0, cap: 0 })
        }
        const usage = yield* locks.localUsage
        assert.strictEqual(usage.capReached, 3)
        assert.isFalse(usage.nearCap)
      })))

  for (const [poolMax, value, words] of [
    [8, "8", "not below DB_POOL_MAX=8"],
    [8, "-1", "negative"],
    [8, "abc", "not a whole number"],
    [8, "2.5", "not a whole number"],
    [1, undefined, "DB_POOL_MAX=1"]
  ] as const) {
    it.live(`refuses to start with RUNLANE_MAX_RESERVED_LOCKS=${value} and DB_POOL_MAX=${poolMax}`, () =>
      Effect.gen(function*() {
        const exit = yield* Effect.exit(withLocksFromEnv(poolMax, value === undefined ? {} : { RUNLANE_MAX_RESERVED_LOCKS: value }, () => Effect.void))
        assert.isTrue(Exit.isFailure(exit))
        const error = Exit.isFailure(exit) ? exit.cause.reasons.find((reason) => reason._tag === "Fail") : undefined
        assert.instanceOf((error as { error: unknown } | undefined)?.error, LockConfigError)
        const configError = (error as { error: LockConfigError }).error
        assert.strictEqual(configError.variable, "RUNLANE_MAX_RESERVED_LOCKS")
        assert.include(configError.message, words)
        if (value !== undefined) assert.include(configError.message, value)
      }))
  }

  it.live("warns once at 80% of the cap, and not again on the next rise within the repeat floor", () =>
    Effect.gen(function*() {
      const warnings: Array<string> = []
      const collect = Logger.make((options) => {
        if (options.logLevel === "Warn") warnings.push(String(options.message))
      })
      yield* withLocksFromEnv(10, { RUNLANE_MAX_RESERVED_LOCKS: "5" }, (locks) =>
        Effect.gen(function*() {
          const scopes = yield* Effect.forEach([0, 1, 2, 3, 4], () => Scope.make())
          for (let n = 0; n < 3; n++) yield* locks.acquire(key(n)).pipe(Scope.provide(scopes[n]!))
          assert.strictEqual(warnings.length, 0)
          yield* locks.acquire(key(3)).pipe(Scope.provide(scopes[3]!)) // 4 of 5: the threshold
          assert.strictEqual(warnings.length, 1)
          yield* locks.acquire(key(4)).pipe(Scope.provide(scopes[4]!))
          assert.strictEqual(warnings.length, 1)
          // Down to 2 of 5 (at or below half: re-armed), then up to the threshold again: within a
          // minute of the first warning, the floor keeps it silent.
          for (const n of [4, 3, 2]) yield* Scope.close(scopes[n]!, Exit.void)
          const again = yield* Effect.forEach([2, 3], () => Scope.make())
          for (const [i, n] of [2, 3].entries()) yield* locks.acquire(key(n)).pipe(Scope.provide(again[i]!))
          assert.strictEqual(warnings.length, 1)
          assert.isTrue((yield* locks.localUsage).nearCap)
          for (const scope of [...scopes, ...again]) yield* Scope.close(scope, Exit.void)
        })).pipe(Effect.provide(Logger.layer([collect])))
      assert.deepStrictEqual(warnings, ["Conversation locks near cap"])
    }))
})

describe("ConversationLocks start-up probe", () => {
  it.live("a start interrupted during the pooler probe leaves no connection pinned", () =>
    Effect.acquireUseRelease(
      Effect.promise(() => createDatabase({ migrated: true })),
      (db) =>
        Effect.gen(function*() {
          const client = postgres(db.url, { max: 2, onnotice: () => {} })
          const layer = ConversationLocks.layer.pipe(
            Layer.provide(Database.layerFromClient(client, { url: Redacted.make(db.url), poolMax: 2 })),
            Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({ RUNLANE_MAX_RESERVED_LOCKS: "1" })))
          )
          // One connection busy: the probe pins the other, then waits for a connection for its transaction.
          const busy = client`select pg_sleep(0.5)`.then(() => undefined)
          const start = yield* Effect.forkChild(Effect.scoped(Layer.build(layer)))
          const admin = postgres(db.url, { max: 1, onnotice: () => {} })
          const deadline = Date.now() + 5_000
          while (Date.now() < deadline) {
            const [row] = yield* Effect.promise(() => admin<Array<{ n: number }>>`
              select count(*)::int as n from pg_stat_activity where datname = ${db.name} and pid <> pg_backend_pid()`)
            if (row!.n === 2) break
            yield* Effect.sleep(10)
          }
          yield* Fiber.interrupt(start)
          yield* Effect.promise(() => busy)
          // Both connections serve the pool again: two concurrent queries on two sessions.
          const pids = yield* Effect.promise(() =>
            Promise.all([0, 1].map(() => client<Array<{ pid: number }>>`select pg_backend_pid() as pid from pg_sleep(0.05)`)))
          assert.strictEqual(new Set(pids.map((rows) => rows[0]!.pid)).size, 2)
          yield* Effect.promise(() => admin.end({ timeout: 5 }))
          yield* Effect.promise(() => client.end({ timeout: 5 }))
        }),
      (db) => Effect.promise(() => dropDatabase(db.name))
    ))
})
