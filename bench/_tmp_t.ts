import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { benchDatabase } from "./harness.ts"
import { Database } from "../src/db/Database.ts"
import { ConversationLocks } from "../src/locks/ConversationLocks.ts"
import { conversationLockHash, defaultLockNamespace } from "../src/locks/lockKey.ts"
const key = { organizationId: "org-bench", agentId: "agent-bench", conversationId: "telegram:6570514069" }
const ns = defaultLockNamespace
const sums = new Map<string, number>(); let last = 0; let on = false
;(globalThis as any).__t = (label: string) => { if (!on) return; const t = performance.now(); sums.set(label, (sums.get(label) ?? 0) + (t - last)); last = t }
const mark = (l: string) => (globalThis as any).__t(l)
await Effect.runPromise(Effect.scoped(Effect.gen(function*() {
  const { url } = yield* benchDatabase
  const raw = postgres(url, { max: 20, onnotice: () => {} })
  const hash = conversationLockHash(key)
  yield* Effect.gen(function*() {
    const locks = yield* ConversationLocks
    const cycle = Effect.scoped(locks.acquire(key)).pipe(Effect.tap(() => Effect.sync(() => mark("afterScope"))))
    const n = 5000
    for (let r = 0; r < 3; r++) {
    for (let i = 0; i < 3000; i++) yield* cycle
    sums.clear(); on = true; last = performance.now()
    for (let i = 0; i < n; i++) { mark("loop"); yield* cycle }
    on = false
    console.log("runlane", [...sums].map(([k, v]) => `${k} ${(v / n * 1000).toFixed(0)}`).join(", "), "total", ([...sums.values()].reduce((a, b) => a + b) / n * 1000).toFixed(0))
    yield* Effect.promise(async () => {
      for (let i = 0; i < 3000; i++) { const r = await raw.reserve(); await r`select pg_try_advisory_lock(${ns}::int4, ${hash}::int4)`; await r`select pg_advisory_unlock(${ns}::int4, ${hash}::int4)`; r.release() }
      sums.clear(); on = true; last = performance.now()
      for (let i = 0; i < n; i++) { mark("loop"); const r = await raw.reserve(); mark("reserved"); await r`select pg_try_advisory_lock(${ns}::int4, ${hash}::int4)`; mark("locked"); await r`select pg_advisory_unlock(${ns}::int4, ${hash}::int4)`; mark("unlocked"); r.release() }
      on = false
      console.log("hand   ", [...sums].map(([k, v]) => `${k} ${(v / n * 1000).toFixed(0)}`).join(", "), "total", ([...sums.values()].reduce((a, b) => a + b) / n * 1000).toFixed(0))
    })
    }
  }).pipe(Effect.provide(ConversationLocks.layerWith({ cap: 15 }).pipe(Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 20 })))))
})))
process.exit(0)
