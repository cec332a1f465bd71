import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { benchDatabase } from "./harness.ts"
import { Database } from "../src/db/Database.ts"
import { ConversationLocks } from "../src/locks/ConversationLocks.ts"
import { conversationLockHash, defaultLockNamespace } from "../src/locks/lockKey.ts"
const key = { organizationId: "org-bench", agentId: "agent-bench", conversationId: "telegram:6570514069" }
const ns = defaultLockNamespace
await Effect.runPromise(Effect.scoped(Effect.gen(function*() {
  const { url } = yield* benchDatabase
  const raw = postgres(url, { max: 20, onnotice: () => {} })
  const hash = conversationLockHash(key)
  yield* Effect.gen(function*() {
    const locks = yield* ConversationLocks
    const cycle = Effect.scoped(locks.acquire(key))
    const n = 4000
    const lib = Effect.gen(function*() { for (let i = 0; i < n; i++) yield* cycle })
    const hand = async () => { for (let i = 0; i < n; i++) { const r = await raw.reserve(); try { await r`select pg_try_advisory_lock(${ns}::int4, ${hash}::int4)`; await r`select pg_advisory_unlock(${ns}::int4, ${hash}::int4)` } finally { r.release() } } }
    const libCpu: number[] = [], handCpu: number[] = [], libWall: number[] = [], handWall: number[] = []
    for (let r = 0; r < 10; r++) {
      let c0 = process.cpuUsage(); let t0 = performance.now()
      yield* lib
      let c = process.cpuUsage(c0); if (r >= 2) { libCpu.push((c.user + c.system) / n); libWall.push((performance.now() - t0) * 1000 / n) }
      c0 = process.cpuUsage(); t0 = performance.now()
      yield* Effect.promise(hand)
      c = process.cpuUsage(c0); if (r >= 2) { handCpu.push((c.user + c.system) / n); handWall.push((performance.now() - t0) * 1000 / n) }
    }
    const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!.toFixed(0)
    console.log(`cpu µs/cycle lib ${med(libCpu)} hand ${med(handCpu)} | wall lib ${med(libWall)} hand ${med(handWall)} ratio ${(Number(med(handWall)) / Number(med(libWall))).toFixed(2)}`)
  }).pipe(Effect.provide(ConversationLocks.layerWith({ cap: 15 }).pipe(Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 20 })))))
})))
process.exit(0)
