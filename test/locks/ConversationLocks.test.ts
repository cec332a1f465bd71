import { assert, layer } from "@effect/vitest"
import { Deferred, Effect, Exit, Fiber, Scope } from "effect"
import { ConversationLocks, LockLost } from "../../src/locks/ConversationLocks.ts"
import { type ConversationKey, conversationLockHash } from "../../src/locks/lockKey.ts"
import {
  advisoryLocksInNamespace,
  eventually,
  expectQuiescent,
  holdersOf,
  LockHarness,
  lockHarnessLayer,
  occupyPool
} from "../support/lockHarness.ts"

const keyA: ConversationKey = { organizationId: "org", agentId: "agent", conversationId: "telegram:1" }
const keyB: ConversationKey = { organizationId: "org", agentId: "agent", conversationId: "telegram:2" }
const keyC: ConversationKey = { organizationId: "org", agentId: "agent", conversationId: "telegram:3" }

layer(lockHarnessLayer({ poolMax: 6, cap: 3 }), { excludeTestServices: true })("ConversationLocks", (it) => {
  it.effect("holds the lock for the life of the scope, on a session pg_locks agrees on", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const scope = yield* Scope.make()
      const lock = yield* locks.acquire(keyA).pipe(Scope.provide(scope))
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(keyA)), [lock.backendPid])
      const during = yield* locks.usage
      assert.strictEqual(during.held, 1)
      assert.strictEqual(during.inFlight, 0)
      assert.strictEqual(during.heldInDatabaseByThisProcess, 1)
      assert.strictEqual(during.heldInDatabase, 1)
      assert.isAtLeast(during.oldestHoldMs!, 0)
      assert.isFalse(yield* lock.isLost)
      yield* Scope.close(scope, Exit.void)
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(keyA)), [])
      const after = yield* locks.localUsage
      assert.strictEqual(after.held, 0)
      assert.isNull(after.oldestHoldMs)
      yield* expectQuiescent
    }))

  it.effect("a second holder gets ConversationBusy and the count comes back down", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const before = yield* locks.localUsage
      yield* Effect.scoped(Effect.gen(function*() {
        yield* locks.acquire(keyA)
        const error = yield* Effect.flip(Effect.scoped(locks.acquire(keyA)))
        assert.strictEqual(error._tag, "ConversationBusy")
        const usage = yield* locks.localUsage
        assert.strictEqual(usage.held, 1)
        assert.strictEqual(usage.inFlight, 0)
        assert.strictEqual(usage.busy, before.busy + 1)
      }))
      yield* expectQuiescent
    }))

  it.effect("pg_locks agrees with `held` after every step", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const agree = Effect.gen(function*() {
        const usage = yield* locks.usage
        assert.strictEqual(usage.heldInDatabaseByThisProcess, usage.held)
        return usage.held
      })
      const a = yield* Scope.make()
      const b = yield* Scope.make()
      const c = yield* Scope.make()
      yield* locks.acquire(keyA).pipe(Scope.provide(a))
      assert.strictEqual(yield* agree, 1)
      yield* locks.acquire(keyB).pipe(Scope.provide(b))
      assert.strictEqual(yield* agree, 2)
      yield* Effect.flip(locks.acquire(keyB).pipe(Scope.provide(c)))
      assert.strictEqual(yield* agree, 2)
      yield* Scope.close(a, Exit.void)
      assert.strictEqual(yield* agree, 1)
      yield* locks.acquire(keyC).pipe(Scope.provide(c))
      assert.strictEqual(yield* agree, 2)
      yield* Scope.close(b, Exit.void)
      yield* Scope.close(c, Exit.void)
      assert.strictEqual(yield* agree, 0)
      yield* expectQuiescent
    }))

  it.effect("at the cap, LockCapReached carries count and cap and leaves the count alone", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      yield* Effect.scoped(Effect.gen(function*() {
        for (const key of [keyA, keyB, keyC]) yield* locks.acquire(key)
        const before = yield* locks.localUsage
        const error = yield* Effect.flip(Effect.scoped(locks.acquire({ ...keyA, conversationId: "x" })))
        assert.deepInclude(error, { _tag: "LockCapReached", count: 3, cap: 3 })
        const after = yield* locks.localUsage
        assert.strictEqual(after.held, 3)
        assert.strictEqual(after.capReached, before.capReached + 1)
      }))
      // Below the cap again, the same acquire succeeds.
      yield* Effect.scoped(locks.acquire({ ...keyA, conversationId: "x" }))
      yield* expectQuiescent
    }))

  it.effect("the session dying while held is noticed, reported, counted, and leaves the pool healthy", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const { admin } = yield* LockHarness
      const before = yield* locks.localUsage
      yield* Effect.scoped(Effect.gen(function*() {
        const lock = yield* locks.acquire(keyA)
        yield* Effect.promise(() => admin`select pg_terminate_backend(${lock.backendPid})`)
        const loss = yield* lock.awaitLost.pipe(Effect.timeout(5_000))
        assert.strictEqual(loss.backendPid, lock.backendPid)
        assert.isTrue(yield* lock.isLost)
        assert.strictEqual((yield* locks.localUsage).lost, before.lost + 1)
        assert.deepStrictEqual(yield* holdersOf(conversationLockHash(keyA)), [])
      }))
      yield* expectQuiescent
      // The conversation can be locked again at once.
      yield* Effect.scoped(locks.acquire(keyA))
    }))

  it.effect("withLock runs the effect under the lock and interrupts it when the lock is lost", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const { admin } = yield* LockHarness
      const value = yield* locks.withLock(keyA, (lock) =>
        Effect.map(holdersOf(conversationLockHash(keyA)), (holders) => holders.length === 1 && holders[0] === lock.backendPid))
      assert.isTrue(value)
      const interrupted = yield* Deferred.make<void>()
      const error = yield* Effect.flip(locks.withLock(keyB, (lock) =>
        Effect.gen(function*() {
          yield* Effect.promise(() => admin`select pg_terminate_backend(${lock.backendPid})`)
          return yield* Effect.never
        }).pipe(Effect.onInterrupt(() => Deferred.succeed(interrupted, undefined)))))
      assert.instanceOf(error, LockLost)
      assert.isTrue(yield* Deferred.isDone(interrupted))
      yield* expectQuiescent
    }))

  it.effect("interrupting a holder releases everything", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const held = yield* Deferred.make<void>()
      const fiber = yield* Effect.forkChild(Effect.scoped(Effect.gen(function*() {
        yield* locks.acquire(keyA)
        yield* Deferred.succeed(held, undefined)
        return yield* Effect.never
      })))
      yield* Deferred.await(held)
      assert.strictEqual((yield* locks.localUsage).held, 1)
      yield* Fiber.interrupt(fiber)
      yield* expectQuiescent
    }))

  it.effect("interrupting an acquire that waits for a connection leaves nothing behind", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      // Every pool connection busy for a while: the acquire waits in reserve().
      const busy = yield* occupyPool(0.5)
      const fiber = yield* Effect.forkChild(Effect.scoped(locks.acquire(keyA)))
      yield* eventually("the acquire in flight", Effect.map(locks.localUsage, (u) => u.inFlight === 1))
      yield* Fiber.interrupt(fiber)
      assert.strictEqual((yield* locks.localUsage).inFlight, 0)
      yield* Effect.promise(() => busy)
      yield* expectQuiescent
    }))

  it.effect("no connection within the reserve timeout is PoolExhausted, and the late connection goes back", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const { poolMax } = yield* LockHarness
      const busy = yield* occupyPool(0.8)
      const error = yield* Effect.flip(Effect.scoped(locks.acquire(keyA)))
      assert.deepInclude(error, { _tag: "PoolExhausted", timeoutMs: 300, poolMax })
      const usage = yield* locks.localUsage
      assert.strictEqual(usage.held + usage.inFlight, 0)
      yield* Effect.promise(() => busy)
      yield* expectQuiescent
    }))

  it.effect("the counts in usage match advisory locks seen by another session", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      yield* Effect.scoped(Effect.gen(function*() {
        yield* locks.acquire(keyA)
        yield* locks.acquire(keyB)
        assert.strictEqual(yield* advisoryLocksInNamespace, 2)
        assert.strictEqual((yield* locks.usage).heldInDatabase, 2)
      }))
      yield* eventually("locks gone", Effect.map(advisoryLocksInNamespace, (n) => n === 0))
    }))
})
