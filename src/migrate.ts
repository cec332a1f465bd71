/**
 * `npm run db:migrate`: applies pending migrations to the service's database and exits.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect } from "effect"
import { Migrator } from "./db/Migrator.ts"
import { serviceDatabaseLayer } from "./db/serviceDatabase.ts"

const program = Effect.gen(function*() {
  const migrator = yield* Migrator
  const report = yield* migrator.migrate
  yield* Effect.logInfo(
    report.appliedNow.length === 0
      ? `Up to date: ${report.status.applied.length} migrations applied`
      : `Applied ${report.appliedNow.join(", ")}; ${report.status.applied.length} migrations applied in all`
  )
})

NodeRuntime.runMain(program.pipe(Effect.provide(Migrator.layer), Effect.provide(serviceDatabaseLayer)))
