/**
 * The runlane service (`npm start`): connects to PostgreSQL (embedded unless `DATABASE_URL` is set),
 * applies migrations, checks the conversation-lock settings, and runs until SIGINT/SIGTERM, then
 * closes the pool and stops the embedded server.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import { Database } from "./db/Database.ts"
import { Migrator } from "./db/Migrator.ts"
import { serviceDatabaseLayer } from "./db/serviceDatabase.ts"
import { ConversationLocks } from "./locks/ConversationLocks.ts"

const Startup = Layer.effectDiscard(
  Effect.gen(function*() {
    const migrator = yield* Migrator
    const report = yield* migrator.migrate
    yield* Effect.logInfo(
      `Migrations: ${report.status.applied.length} applied (${report.appliedNow.length} just now), ` +
        `${report.status.pending.length} pending`
    )
    const locks = yield* ConversationLocks
    const { poolMax } = yield* Database
    const { cap } = yield* locks.localUsage
    yield* Effect.logInfo(`Conversation locks: at most ${cap} of ${poolMax} pool connections pinned`)
    yield* Effect.logInfo("runlane is running; press Ctrl-C to stop")
    yield* Effect.addFinalizer(() => Effect.logInfo("runlane is shutting down"))
  })
)

// Building ConversationLocks.layer validates its configuration and refuses a transaction pooler, so a
// bad setting stops the service at start, naming the variable.
const Main = Startup.pipe(
  Layer.provide(Layer.mergeAll(Migrator.layer, ConversationLocks.layer)),
  Layer.provide(serviceDatabaseLayer)
)

NodeRuntime.runMain(Layer.launch(Main))
