/**
 * The runlane service (`npm start`): connects to PostgreSQL (embedded unless `DATABASE_URL` is set),
 * applies migrations, and runs until SIGINT/SIGTERM, then closes the pool and stops the embedded server.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect, Layer } from "effect"
import { Migrator } from "./db/Migrator.ts"
import { serviceDatabaseLayer } from "./db/serviceDatabase.ts"

const Startup = Layer.effectDiscard(
  Effect.gen(function*() {
    const migrator = yield* Migrator
    const report = yield* migrator.migrate
    yield* Effect.logInfo(
      `Migrations: ${report.status.applied.length} applied (${report.appliedNow.length} just now), ` +
        `${report.status.pending.length} pending`
    )
    yield* Effect.logInfo("runlane is running; press Ctrl-C to stop")
    yield* Effect.addFinalizer(() => Effect.logInfo("runlane is shutting down"))
  })
)

const Main = Startup.pipe(Layer.provide(Migrator.layer), Layer.provide(serviceDatabaseLayer))

NodeRuntime.runMain(Layer.launch(Main))
