import { Effect, Layer, References, Scope, Exit } from "effect"
import { startEmbeddedPostgres } from "./src/db/EmbeddedPostgres.ts"
import { Database } from "./src/db/Database.ts"
import { ConversationLocks } from "./src/locks/ConversationLocks.ts"
import { mkdtemp, chmod } from "node:fs/promises"
const parent = await mkdtemp("/tmp/exp-"); await chmod(parent, 0o755)
const scope = Effect.runSync(Scope.make())
const server = await Effect.runPromise(startEmbeddedPostgres({ dataDir: parent + "/pg", persistent: false, database: "exp", fsync: false }).pipe(Scope.provide(scope)))
const key = { organizationId: "o", agentId: "a", conversationId: "c" }
const now = () => Number(process.hrtime.bigint()) / 1e6
await Effect.runPromise(Effect.gen(function*() {
  const locks = yield* ConversationLocks
  const db = yield* Database
  const raw = db.sql
  const hand = async () => { const r = await raw.reserve(); await r`select pg_try_advisory_lock(${1}::int4, ${2}::int4) as locked`; await r`select pg_advisory_unlock(${1}::int4, ${2}::int4)`; r.release() }
  const variants: Record<string, Effect.Effect<unknown, unknown>> = { lib: Effect.scoped(locks.acquire(key)), hand: Effect.promise(hand) }
  for (let r = 0; r < 4; r++) for (const [k, v] of Object.entries(variants)) {
    const s = now()
    for (let i = 0; i < 2000; i++) yield* v
    if (r > 0) console.log(k, "wall ms/cycle", ((now() - s) / 2000).toFixed(3))
  }
}).pipe(Effect.provide(ConversationLocks.layerWith({ cap: 15 }).pipe(Layer.provideMerge(Database.layerWith({ url: server.url, poolMax: 20 })), Layer.provideMerge(Layer.succeed(References.MinimumLogLevel, "Error"))))))
await Effect.runPromise(Scope.close(scope, Exit.void))
