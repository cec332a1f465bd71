/**
 * The count belongs to the attempt, not to the caller's scope; a session that may hold a lock is never
 * forgotten; the watchdog needs evidence; "this process" in usage means this process's sessions.
 * Each test here reproduced a defect of the first lock implementation before it was fixed.
 */
import { spawn } from "node:child_process"
import { assert, layer } from "@effect/vitest"
import { Effect, Exit, Fiber, Layer, Redacted, Scope } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { type ConversationKey, conversationLockHash, defaultLockNamespace } from "../../src/locks/lockKey.ts"
import {
  advisoryLocksInNamespace,
  eventually,
  expectQuiescent,
  holdersOf,
  LockHarness,
  lockHarnessLayer,
  occupyPool
} from "../support/lockHarness.ts"
import { hostAndPort, startTcpProxy, throughProxy } from "../support/tcpProxy.ts"

const key = (n: number): ConversationKey => ({ organizationId: "org", agentId: "agent", conversationId: `release:${n}` })

const counts = Effect.gen(function*() {
  const usage = yield* (yield* ConversationLocks).localUsage
  return { held: usage.held, inFlight: usage.inFlight, stranded: usage.stranded }
})

/** Holds a lock through three keepalives that each meet `fault`, then checks the lock was never reported lost. */
const survivesStalls = (fault: "stall" | "stallBeforeWrite", stallMs: number) =>
  Effect.gen(function*() {
    const locks = yield* ConversationLocks
    const harness = yield* LockHarness
    harness.clearFaults()
    harness.faults.stallMs = stallMs
    harness.faults.keepalive.push(fault, fault, fault)
    const before = (yield* locks.localUsage).lost
    yield* Effect.scoped(Effect.gen(function*() {
      const lock = yield* locks.acquire(key(1))
      yield* eventually("three stalls", Effect.sync(() => harness.faults.keepalive.length === 0), 10_000)
      // Another keepalive answered after the stalls: a false loss would have been reported by then.
      yield* eventually("keepalives after the stalls", Effect.promise(() =>
        harness.admin<Array<{ n: number }>>`select count(*)::int as n from pg_stat_activity
          where pid = ${lock.backendPid} and query = 'select 1' and state_change > now() - interval '100 ms'`
      ).pipe(Effect.map((rows) => rows[0]!.n === 1)), 5_000)
      assert.isFalse(yield* lock.isLost)
    }))
    assert.strictEqual((yield* locks.localUsage).lost, before)
    yield* expectQuiescent
  })

layer(lockHarnessLayer({ poolMax: 6, cap: 3 }), { excludeTestServices: true })("ConversationLocks release paths", (it) => {
  it.effect("retrying a busy conversation inside one open scope never reaches the cap", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const holder = yield* Scope.make()
      yield* locks.acquire(key(1)).pipe(Scope.provide(holder))
      yield* Effect.scoped(Effect.gen(function*() {
        for (let attempt = 0; attempt < 6; attempt++) {
          const error = yield* Effect.flip(locks.acquire(key(1)))
          assert.strictEqual(error._tag, "ConversationBusy", `attempt ${attempt}`)
          assert.deepStrictEqual(yield* counts, { held: 1, inFlight: 0, stranded: 0 }, `after attempt ${attempt}`)
        }
        // Still inside the scope that saw six refusals: another conversation is served.
        yield* locks.acquire(key(2))
        assert.deepStrictEqual(yield* counts, { held: 2, inFlight: 0, stranded: 0 })
      }))
      yield* Scope.close(holder, Exit.void)
      yield* expectQuiescent
    }))

  it.effect("timed-out reserves inside one open scope give their count back, and the scope serves once the pool is free", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      yield* Effect.scoped(Effect.gen(function*() {
        const busy = yield* occupyPool(1)
        for (let attempt = 0; attempt < 2; attempt++) {
          const error = yield* Effect.flip(locks.acquire(key(1)))
          assert.strictEqual(error._tag, "PoolExhausted", `attempt ${attempt}`)
          assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 }, `after attempt ${attempt}`)
        }
        yield* Effect.promise(() => busy)
        yield* locks.acquire(key(1))
        assert.deepStrictEqual(yield* counts, { held: 1, inFlight: 0, stranded: 0 })
      }))
      yield* expectQuiescent
    }))

  it.effect("an acquire on a closed scope takes nothing", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const scope = yield* Scope.make()
      yield* Scope.close(scope, Exit.void)
      const exit = yield* Effect.exit(locks.acquire(key(1)).pipe(Scope.provide(scope)))
      assert.isTrue(Exit.isFailure(exit))
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
      assert.strictEqual(yield* advisoryLocksInNamespace, 0)
      yield* expectQuiescent
    }))

  it.effect("a scope closed while its acquire waits for a connection ends the attempt with nothing held", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      // The pool frees up before the reserve timeout (300 ms), so the connection does arrive.
      const busy = yield* occupyPool(0.2)
      const scope = yield* Scope.make()
      const fiber = yield* Effect.forkChild(Effect.exit(locks.acquire(key(1)).pipe(Scope.provide(scope))))
      yield* eventually("the acquire in flight", Effect.map(counts, (c) => c.inFlight === 1))
      yield* Scope.close(scope, Exit.void)
      const exit = yield* Fiber.join(fiber)
      assert.isTrue(Exit.isFailure(exit))
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
      yield* Effect.promise(() => busy)
      // The connection that arrives later goes straight back: no lock, and inFlight never below zero.
      yield* expectQuiescent
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
    }))

  it.effect("a scope closed while the lock query runs ends the attempt, though the lock is granted after", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      harness.clearFaults()
      harness.faults.lateMs = 100
      harness.faults.firstQuery.push("slow")
      const scope = yield* Scope.make()
      const fiber = yield* Effect.forkChild(Effect.exit(locks.acquire(key(1)).pipe(Scope.provide(scope))))
      yield* eventually("the lock query sent", Effect.sync(() => harness.faults.fired.includes("firstQuery:slow")))
      yield* Scope.close(scope, Exit.void)
      assert.isTrue(Exit.isFailure(yield* Fiber.join(fiber)), "the acquire ended without a lock")
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [])
      yield* expectQuiescent
    }))

  it.effect("a scope closed while the lock query is unanswered ends the session and leaks no lock", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      harness.clearFaults()
      harness.faults.firstQuery.push("hang")
      const scope = yield* Scope.make()
      const fiber = yield* Effect.forkChild(Effect.exit(locks.acquire(key(1)).pipe(Scope.provide(scope))))
      yield* eventually("the lock query sent", Effect.sync(() => harness.faults.fired.includes("firstQuery:hang")))
      // The query ran, so the lock is held on the server though the client never heard.
      yield* eventually("the lock taken on the server", Effect.map(holdersOf(conversationLockHash(key(1))), (h) => h.length === 1))
      yield* Scope.close(scope, Exit.void)
      assert.isTrue(Exit.isFailure(yield* Fiber.join(fiber)))
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [])
      yield* expectQuiescent
    }))

  it.effect("a session whose end cannot be confirmed stays counted as stranded, and is terminated once reachable", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      harness.clearFaults()
      const scope = yield* Scope.make()
      const lock = yield* locks.acquire(key(1)).pipe(Scope.provide(scope))
      harness.faults.unlock.push("throw", "throw", "throw")
      harness.terminatePath.mode = "refuse"
      yield* Scope.close(scope, Exit.void)
      assert.deepStrictEqual(harness.faults.fired, ["unlock:throw", "unlock:throw", "unlock:throw"])
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 1 })
      // The session still holds the lock; it never went back to the pool.
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [lock.backendPid])
      assert.isTrue(harness.logs.some((line) => line.level === "Error" && line.annotations["connection"] === "stranded"))
      // Stranded sessions count against the cap: 1 stranded + 2 held = 3.
      yield* Effect.scoped(Effect.gen(function*() {
        yield* locks.acquire(key(2))
        yield* locks.acquire(key(3))
        assert.strictEqual((yield* Effect.flip(locks.acquire(key(4))))._tag, "LockCapReached")
      }))
      harness.terminatePath.mode = "pass"
      yield* eventually("the stranded session terminated", Effect.map(counts, (c) => c.stranded === 0), 10_000)
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [])
      assert.isTrue(harness.logs.some((line) => line.message.includes("Stranded lock session ended")))
      yield* expectQuiescent
    }))

  it.effect("an event-loop stall longer than the keepalive does not report a live session lost", () =>
    survivesStalls("stall", 3 * 250))

  // keepalive 250 ms: a probe every 125 ms, due within 125 ms; a stall of 1.2 periods before the write.
  it.effect("an event-loop stall between a keepalive's creation and its write does not report a live session lost", () =>
    survivesStalls("stallBeforeWrite", 150))

  it.effect("a lock granted on a connection that closed before it could be held fails the acquire and leaks nothing", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      harness.clearFaults()
      harness.faults.lateMs = 300
      harness.faults.firstQuery.push("slow")
      const fiber = yield* Effect.forkChild(Effect.scoped(locks.acquire(key(1))))
      // The lock is granted on the server; its answer is still on its way when the backend dies.
      yield* eventually("the lock taken on the server", Effect.map(holdersOf(conversationLockHash(key(1))), (h) => h.length === 1))
      const [pid] = yield* holdersOf(conversationLockHash(key(1)))
      yield* Effect.promise(() => harness.admin`select pg_terminate_backend(${pid!})`)
      const exit = yield* Fiber.await(fiber)
      assert.isTrue(Exit.isFailure(exit) && exit.cause.reasons.some((r) => r._tag === "Fail" && (r.error as { _tag: string })._tag === "DatabaseError"))
      assert.deepStrictEqual(yield* counts, { held: 0, inFlight: 0, stranded: 0 })
      yield* expectQuiescent
    }))

  it.effect("a keepalive that gets no answer reports the loss, and the session is terminated at release", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      harness.clearFaults()
      harness.faults.keepalive.push("hang")
      yield* Effect.scoped(Effect.gen(function*() {
        const lock = yield* locks.acquire(key(1))
        const loss = yield* lock.awaitLost.pipe(Effect.timeout(5_000))
        assert.include(loss.reason, "keepalive unanswered")
      }))
      assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [])
      yield* expectQuiescent
    }))

  it.effect("the near-cap warning fires once over 100 storms that each reach the threshold", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      const warningsBefore = harness.logs.filter((line) => line.message === "Conversation locks near cap").length
      for (let cycle = 0; cycle < 100; cycle++) {
        yield* Effect.scoped(Effect.forEach([1, 2, 3], (n) => locks.acquire(key(n)), { concurrency: "unbounded" }))
      }
      const warnings = harness.logs.filter((line) => line.message === "Conversation locks near cap").length - warningsBefore
      assert.isAtMost(warnings, 1)
      yield* expectQuiescent
    }))
})

layer(lockHarnessLayer({ poolMax: 3, cap: 1 }), { excludeTestServices: true })("ConversationLocks at cap 1", (it) => {
  it.effect("100 lock cycles warn at most once", () =>
    Effect.gen(function*() {
      const locks = yield* ConversationLocks
      const harness = yield* LockHarness
      for (let cycle = 0; cycle < 100; cycle++) yield* Effect.scoped(locks.acquire(key(1)))
      const warnings = harness.logs.filter((line) => line.message === "Conversation locks near cap")
      assert.strictEqual(warnings.length, 1)
      yield* expectQuiescent
    }))
})

/** A second OS process holding one advisory lock of the namespace, on a connection without application_name. */
const holdInAnotherProcess = (url: string, hash: number) =>
  Effect.acquireRelease(
    Effect.callback<ReturnType<typeof spawn>>((resume) => {
      const script = `import postgres from "postgres"
        const sql = postgres(${JSON.stringify(url)}, { max: 1 })
        await sql\`select pg_advisory_lock(${defaultLockNamespace}, ${hash})\`
        console.log("held")
        process.stdin.on("end", () => sql.end().then(() => process.exit(0)))
        process.stdin.resume()`
      const child = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["pipe", "pipe", "inherit"] })
      child.stdout!.on("data", (chunk: Buffer) => {
        if (chunk.toString().includes("held")) resume(Effect.succeed(child))
      })
    }),
    (child) => Effect.callback<void>((resume) => {
      child.once("exit", () => resume(Effect.void))
      child.stdin!.end()
    })
  )

layer(lockHarnessLayer({ poolMax: 4, cap: 2 }), { excludeTestServices: true })("ConversationLocks usage", (it) => {
  it.effect("counts only this process's sessions when pools set no application_name", () =>
    Effect.gen(function*() {
      const harness = yield* LockHarness
      yield* holdInAnotherProcess(harness.url, 12345)
      const client = yield* Effect.acquireRelease(
        Effect.sync(() => postgres(harness.url, { max: 3, onnotice: () => {} })),
        (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
      )
      const usage = yield* Effect.gen(function*() {
        const locks = yield* ConversationLocks
        yield* locks.acquire(key(1))
        return yield* locks.usage
      }).pipe(Effect.provide(ConversationLocks.layerWith({ cap: 2 }).pipe(
        Layer.provideMerge(Database.layerFromClient(client, { url: Redacted.make(harness.url), poolMax: 3 }))
      )))
      assert.strictEqual(usage.heldInDatabase, 2)
      assert.strictEqual(usage.heldInDatabaseByThisProcess, 1)
    }).pipe(Effect.scoped))
})

layer(lockHarnessLayer({ poolMax: 4, cap: 2 }), { excludeTestServices: true })("ConversationLocks behind a connection reset", (it) => {
  it.effect("a connection the client saw reset while the server session lives on is terminated, never trusted gone", () =>
    Effect.gen(function*() {
      const harness = yield* LockHarness
      const path = yield* Effect.acquireRelease(
        Effect.promise(() => startTcpProxy(hostAndPort(harness.url))),
        (proxy) => Effect.promise(proxy.close)
      )
      const client = yield* Effect.acquireRelease(
        Effect.sync(() => postgres(throughProxy(harness.url, path), { max: 3, onnotice: () => {} })),
        (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
      )
      yield* Effect.gen(function*() {
        const locks = yield* ConversationLocks
        yield* Effect.scoped(Effect.gen(function*() {
          const lock = yield* locks.acquire(key(1))
          path.cutClients()
          yield* lock.awaitLost.pipe(Effect.timeout(5_000))
          // The client believes the session gone; on the server it lives on and holds the lock.
          assert.deepStrictEqual(yield* holdersOf(conversationLockHash(key(1))), [lock.backendPid])
        }))
        // Terminated by the release: the backend exits at once, and its lock with it.
        yield* eventually("the server session gone", Effect.map(holdersOf(conversationLockHash(key(1))), (h) => h.length === 0))
        const usage = yield* locks.localUsage
        assert.deepStrictEqual([usage.held, usage.inFlight, usage.stranded], [0, 0, 0])
      }).pipe(Effect.provide(ConversationLocks.layerWith({ cap: 2, keepaliveMs: 250 }).pipe(
        Layer.provideMerge(Database.layerFromClient(client, { url: Redacted.make(harness.url), poolMax: 3 }))
      )))
    }).pipe(Effect.scoped))
})
