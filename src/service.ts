/**
 * The runlane service as one layer: database (embedded or DATABASE_URL), migrations, services, and
 * the HTTP server on PORT. `main.ts` launches it; tests launch it with extra layers on top.
 *
 * Closing it runs in dependency order: the work loop stops (claims nothing new, waits a bounded time for
 * its handlers, releases the rest), the HTTP server stops accepting and drains (bounded), conversation
 * locks still held are released, the pool ends, and the embedded server stops.
 */
import { Config, Context, Effect, Layer, Option, Schema } from "effect"
import { HttpServer } from "effect/http"
import { Database } from "./db/Database.ts"
import { Migrator } from "./db/Migrator.ts"
import { ServiceDatabaseSource, serviceDatabaseLayer, serviceStateDirConfig } from "./db/serviceDatabase.ts"
import { httpServerLayer } from "./http/server.ts"
import { ConversationLocks } from "./locks/ConversationLocks.ts"
import { loadOrCreateTokenSecret } from "./ownership/generatedTokenSecret.ts"
import { RunOwnership } from "./ownership/RunOwnership.ts"
import { tokenSecretVariable, WorkerTokens } from "./ownership/WorkerTokens.ts"
import { RunRetention } from "./runs/RunRetention.ts"
import { RunsQueue } from "./runs/RunsQueue.ts"
import { RunWorker } from "./runs/RunWorker.ts"
import { serviceWorkerLayer } from "./serviceWorker.ts"
import { TranscriptSnapshots } from "./snapshots/TranscriptSnapshots.ts"

export const defaultPort = 8787
export const defaultHost = "127.0.0.1"

/** RUNLANE_TOKEN_SECRET; with the embedded database only, a generated secret kept beside the data. */
const serviceTokensLayer = Layer.unwrap(Effect.gen(function*() {
  const configured = yield* Config.option(Config.Redacted(tokenSecretVariable))
  const { embedded } = yield* ServiceDatabaseSource
  if (Option.isSome(configured) || !embedded) return WorkerTokens.layer
  const stateDir = yield* serviceStateDirConfig
  return WorkerTokens.layerWith({ secret: yield* loadOrCreateTokenSecret(`${stateDir}/token-secret`) })
}))

/** PORT: 1-65535, or 0 for any free port (the start-up line says which). */
const portConfig = Effect.gen(function*() {
  const port = yield* Config.Int("PORT").pipe(Config.withDefault(defaultPort))
  if (port < 0 || port > 65535) return yield* new ServiceConfigError({ variable: "PORT", message: `PORT=${port} is not a TCP port (0-65535)` })
  return port
})

export class ServiceConfigError extends Schema.TaggedError<ServiceConfigError>()("ServiceConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}

/** The service refused to start because the database is behind the code. */
export class MigrationsPending extends Schema.TaggedError<MigrationsPending>()("MigrationsPending", {
  pending: Schema.Array(Schema.String),
  message: Schema.String
}) {}

/**
 * The start-up gate. `RUNLANE_MIGRATE` (defaults to true): apply pending migrations before anything
 * else uses the database. false (deployments that migrate in a separate step): refuse to start while a
 * migration is pending, naming it.
 */
const migrated = Layer.effectDiscard(Effect.gen(function*() {
  const migrator = yield* Migrator
  if (!(yield* Config.Boolean("RUNLANE_MIGRATE").pipe(Config.withDefault(true)))) {
    const status = yield* migrator.status
    if (status.pending.length > 0) {
      return yield* new MigrationsPending({
        pending: status.pending,
        message: `${status.pending.length} migration(s) pending: ${status.pending.join(", ")}; ` +
          "run npm run db:migrate, or start without RUNLANE_MIGRATE=false"
      })
    }
    yield* Effect.logInfo(`Migrations: ${status.applied.length} applied, none pending (RUNLANE_MIGRATE=false)`)
    return
  }
  const report = yield* migrator.migrate
  yield* Effect.logInfo(
    `Migrations: ${report.status.applied.length} applied (${report.appliedNow.length} just now), ` +
      `${report.status.pending.length} pending`
  )
}))

/**
 * Everything the routes and the work loop use, over a migrated database; ConversationLocks validates
 * its settings here. RunWorker (the LISTEN connection and the kept conversations) sees the others.
 */
export const serviceCoreLayer = Layer.mergeAll(RunWorker.layer, RunRetention.layer).pipe(
  Layer.provideMerge(Layer.mergeAll(
    ConversationLocks.layer,
    RunsQueue.layer,
    RunOwnership.layer,
    TranscriptSnapshots.layer,
    serviceTokensLayer
  )),
  Layer.provideMerge(Layer.merge(Migrator.layer, migrated.pipe(Layer.provide(Migrator.layer)))),
  Layer.provideMerge(serviceDatabaseLayer)
)

const announce = Layer.effectDiscard(Effect.gen(function*() {
  const { poolMax } = yield* Database
  const { cap } = yield* (yield* ConversationLocks).localUsage
  const base = HttpServer.formatAddress((yield* HttpServer.HttpServer).address)
  yield* Effect.logInfo(`Conversation locks: at most ${cap} of ${poolMax} pool connections pinned`)
  yield* Effect.logInfo(`runlane listening on ${base}; try: curl ${base}/health/orchestrator (Ctrl-C stops)`)
  yield* Effect.addFinalizer(() => Effect.logInfo("runlane is shutting down"))
}))

/**
 * The whole service. `extra` runs on top of the core services (tests use it to hold a lock); it is
 * closed after the HTTP server has drained and before the core services.
 */
export const makeServiceLayer = <E>(extra: Layer.Layer<never, E, Layer.Success<typeof serviceCoreLayer>> = Layer.empty) =>
  Layer.unwrap(Effect.gen(function*() {
    const port = yield* portConfig
    const host = yield* Config.String("HOST").pipe(Config.withDefault(defaultHost))
    // Built in this order and closed in reverse: core services, extra, HTTP server, work loop,
    // announcement. The work loop stops first, while its handlers can still upload over HTTP.
    return announce.pipe(
      Layer.provideMerge(serviceWorkerLayer),
      Layer.provideMerge(httpServerLayer({ port, host })),
      Layer.provideMerge(extra.pipe(Layer.provideMerge(serviceCoreLayer)))
    )
  }))

/**
 * The service until it is interrupted (a stop signal), or until its embedded database dies under it:
 * then it logs why and fails, so the process exits non-zero and a supervisor restarts it, instead of
 * answering 500 to every database route for ever.
 */
export const launchService = <E>(extra: Layer.Layer<never, E, Layer.Success<typeof serviceCoreLayer>> = Layer.empty) =>
  Effect.scoped(Effect.gen(function*() {
    const services = yield* Layer.build(makeServiceLayer(extra))
    return yield* Context.get(services, ServiceDatabaseSource).died.pipe(
      Effect.tapError(() => Effect.logError("Embedded PostgreSQL exited unexpectedly; stopping runlane so it can be restarted"))
    )
  }))
