/**
 * The harness of the conversation-lock tests: a migrated database of its own, runlane's Database over
 * a fault-injecting pool, ConversationLocks over it, and an admin connection that watches pg_locks and
 * terminates backends. `expectQuiescent` asserts the invariants every test ends with.
 */
import { randomUUID } from "node:crypto"
import { assert } from "@effect/vitest"
import { Context, Effect, Layer, Logger, Redacted, References } from "effect"
import postgres from "postgres"
import { Database } from "../../src/db/Database.ts"
import { ConversationLocks, type ConversationLocksOptions } from "../../src/locks/ConversationLocks.ts"
import { defaultLockNamespace } from "../../src/locks/lockKey.ts"
import { type FaultQueues, makeFaultyClient } from "./faultyClient.ts"
import { hostAndPort, startTcpProxy, type TcpProxy, throughProxy } from "./tcpProxy.ts"
import { acquireTestDatabase } from "./testDatabase.ts"

export interface LoggedLine {
  readonly level: string
  readonly message: string
  readonly annotations: Readonly<Record<string, unknown>>
}

export class LockHarness extends Context.Service<LockHarness, {
  readonly faults: FaultQueues
  /** Clears every queued fault and the record of fired ones. */
  readonly clearFaults: () => void
  /** The path of runlane's one-off terminate connections: cut it to make a terminate fail. */
  readonly terminatePath: TcpProxy
  /** Every line ConversationLocks logged at Info or above, oldest first. */
  readonly logs: Array<LoggedLine>
  /** A connection outside runlane's pool. */
  readonly admin: postgres.Sql
  readonly poolMax: number
  readonly applicationName: string
  readonly url: string
}>()("test/LockHarness") {}

export interface HarnessOptions extends Partial<ConversationLocksOptions> {
  readonly poolMax: number
}

/** Short timings keep fault cases fast; they are the same code paths as the defaults. */
export const testTimings = { reserveTimeoutMs: 300, keepaliveMs: 250, releaseTimeoutMs: 300, terminateTimeoutMs: 1_000 } as const

export const lockHarnessLayer = (options: HarnessOptions) =>
  Layer.unwrap(
    Effect.gen(function*() {
      const handle = yield* acquireTestDatabase
      const applicationName = `runlane-test:${randomUUID()}`
      const faulty = yield* Effect.acquireRelease(
        Effect.sync(() => makeFaultyClient(handle.url, options.poolMax, applicationName)),
        (client) => Effect.promise(client.end)
      )
      const terminatePath = yield* Effect.acquireRelease(
        Effect.promise(() => startTcpProxy(hostAndPort(handle.url))),
        (proxy) => Effect.promise(proxy.close)
      )
      const admin = yield* Effect.acquireRelease(
        Effect.sync(() => postgres(handle.url, { max: 2, onnotice: () => {} })),
        (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
      )
      // runlane's terminate connections go through the proxy; the pool itself connects directly.
      const database = Database.layerFromClient(faulty.sql, {
        url: Redacted.make(throughProxy(handle.url, terminatePath)),
        poolMax: options.poolMax
      })
      const locks = ConversationLocks.layerWith({
        cap: options.cap ?? Math.max(1, options.poolMax - 5),
        namespace: options.namespace ?? defaultLockNamespace,
        reserveTimeoutMs: options.reserveTimeoutMs ?? testTimings.reserveTimeoutMs,
        keepaliveMs: options.keepaliveMs ?? testTimings.keepaliveMs,
        releaseTimeoutMs: options.releaseTimeoutMs ?? testTimings.releaseTimeoutMs,
        terminateTimeoutMs: options.terminateTimeoutMs ?? testTimings.terminateTimeoutMs
      })
      const logs: Array<LoggedLine> = []
      const collect = Logger.make((line) => {
        if (line.logLevel === "Debug" || line.logLevel === "Trace") return
        const message = Array.isArray(line.message) ? line.message.map(String).join(" ") : String(line.message)
        logs.push({ level: line.logLevel, message, annotations: { ...line.fiber.getRef(References.CurrentLogAnnotations) } })
      })
      const harness = Layer.succeed(LockHarness, {
        faults: faulty.faults,
        clearFaults: faulty.clear,
        terminatePath,
        logs,
        admin,
        poolMax: options.poolMax,
        applicationName,
        url: handle.url
      })
      return Layer.mergeAll(locks, harness).pipe(
        Layer.provideMerge(database),
        Layer.provideMerge(Logger.layer([collect]))
      )
    })
  )

/** Polls `check` until it returns true, failing with `message` after `timeoutMs`. */
export const eventually = <R>(message: string, check: Effect.Effect<boolean, unknown, R>, timeoutMs = 5_000) =>
  Effect.gen(function*() {
    const deadline = Date.now() + timeoutMs
    while (!(yield* check)) {
      if (Date.now() > deadline) return yield* Effect.die(new Error(`timed out waiting: ${message}`))
      yield* Effect.sleep(10)
    }
  })

/**
 * Starts `seconds`-long queries on every pool connection and waits until the server runs them all, so
 * the pool has no free connection left. Resolves the returned promise when they finish.
 */
export const occupyPool = (seconds: number) =>
  Effect.gen(function*() {
    const { sql } = yield* Database
    const { admin, poolMax, applicationName } = yield* LockHarness
    const busy = Promise.all(Array.from({ length: poolMax }, () => sql`select pg_sleep(${seconds})`))
    yield* eventually(
      "every pool connection busy",
      Effect.map(
        Effect.promise(() =>
          admin<Array<{ n: number }>>`
            select count(*)::int as n from pg_stat_activity
             where application_name = ${applicationName} and state = 'active' and query like '%pg_sleep%'`),
        (rows) => rows[0]!.n === poolMax
      )
    )
    return busy
  })

export const advisoryLocksInNamespace = Effect.gen(function*() {
  const { admin } = yield* LockHarness
  const rows = yield* Effect.promise(() =>
    admin<Array<{ n: number }>>`
      select count(*)::int as n from pg_locks
       where locktype = 'advisory' and classid = ${String(defaultLockNamespace >>> 0)}::oid and objsubid = 2`)
  return rows[0]!.n
})

/** Pids that hold the advisory lock `hash` of the default namespace. */
export const holdersOf = (hash: number) =>
  Effect.gen(function*() {
    const { admin } = yield* LockHarness
    const rows = yield* Effect.promise(() =>
      admin<Array<{ pid: number }>>`
        select pid from pg_locks
         where locktype = 'advisory' and granted and objsubid = 2
           and classid = ${String(defaultLockNamespace >>> 0)}::oid and objid = ${String(hash >>> 0)}::oid`)
    return rows.map((row) => row.pid)
  })

/**
 * The state every lock test must end in: nothing counted, nothing in pg_locks for the namespace, and
 * the pool able to run DB_POOL_MAX queries at once on DB_POOL_MAX distinct sessions (a connection
 * stranded in a reserved or broken state would make two queries share one session, or hang).
 */
export const expectQuiescent = Effect.gen(function*() {
  const locks = yield* ConversationLocks
  const database = yield* Database
  const harness = yield* LockHarness
  yield* eventually("no lock held", Effect.map(locks.localUsage, (u) => u.held === 0))
  yield* eventually("no acquire in flight", Effect.map(locks.localUsage, (u) => u.inFlight === 0))
  yield* eventually("no stranded session", Effect.map(locks.localUsage, (u) => u.stranded === 0))
  yield* eventually("no advisory lock left in the namespace", Effect.map(advisoryLocksInNamespace, (n) => n === 0))
  // A reservation that arrived after its timeout is released on arrival, so allow it to come back;
  // a stranded connection never does.
  const distinctSessions = Effect.promise(() =>
    Promise.all(Array.from({ length: harness.poolMax }, () =>
      database.sql<Array<{ pid: number }>>`select pg_backend_pid() as pid from pg_sleep(0.05)`))
  ).pipe(Effect.map((results) => new Set(results.map((rows) => rows[0]!.pid)).size))
  yield* eventually("the pool serves DB_POOL_MAX concurrent queries on distinct sessions",
    Effect.map(distinctSessions, (n) => n === harness.poolMax))
  const usage = yield* locks.usage
  assert.strictEqual(usage.heldInDatabaseByThisProcess, 0)
})
