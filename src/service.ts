/**
 * The runlane service as one layer: database (embedded or DATABASE_URL), migrations, services, and
 * the HTTP server on PORT. `main.ts` launches it; tests launch it with extra layers on top.
 *
 * Closing it runs in dependency order: the HTTP server stops accepting and drains (bounded), then
 * conversation locks still held are released, then the pool ends, then the embedded server stops.
 */
import { Config, Effect, Layer, Option } from "effect"
import { Database } from "./db/Database.ts"
import { Migrator } from "./db/Migrator.ts"
import { ServiceDatabaseSource, serviceDatabaseLayer, serviceStateDir } from "./db/serviceDatabase.ts"
import { httpServerLayer } from "./http/server.ts"
import { ConversationLocks } from "./locks/ConversationLocks.ts"
import { loadOrCreateTokenSecret } from "./ownership/generatedTokenSecret.ts"
import { RunOwnership } from "./ownership/RunOwnership.ts"
import { tokenSecretVariable, WorkerTokens } from "./ownership/WorkerTokens.ts"
import { RunsQueue } from "./runs/RunsQueue.ts"
import { TranscriptSnapshots } from "./snapshots/TranscriptSnapshots.ts"

export const defaultPort = 8787
export const defaultHost = "127.0.0.1"
export const generatedTokenSecretFile = `${serviceStateDir}/token-secret`

/** RUNLANE_TOKEN_SECRET; with the embedded database only, a generated secret kept beside the data. */
const serviceTokensLayer = Layer.unwrap(Effect.gen(function*() {
  const configured = yield* Config.option(Config.Redacted(tokenSecretVariable))
  const { embedded } = yield* ServiceDatabaseSource
  if (Option.isSome(configured) || !embedded) return WorkerTokens.layer
  return WorkerTokens.layerWith({ secret: yield* loadOrCreateTokenSecret(generatedTokenSecretFile) })
}))

/** Applies pending migrations before anything else uses the database. */
const migrated = Layer.effectDiscard(Effect.gen(function*() {
  const report = yield* (yield* Migrator).migrate
  yield* Effect.logInfo(
    `Migrations: ${report.status.applied.length} applied (${report.appliedNow.length} just now), ` +
      `${report.status.pending.length} pending`
  )
}))

/** Everything the routes use, over a migrated database; ConversationLocks validates its settings here. */
export const serviceCoreLayer = Layer.mergeAll(
  ConversationLocks.layer,
  RunsQueue.layer,
  RunOwnership.layer,
  TranscriptSnapshots.layer,
  serviceTokensLayer
).pipe(
  Layer.provideMerge(Layer.merge(Migrator.layer, migrated.pipe(Layer.provide(Migrator.layer)))),
  Layer.provideMerge(serviceDatabaseLayer)
)

const announce = (port: number, host: string) =>
  Layer.effectDiscard(Effect.gen(function*() {
    const { poolMax } = yield* Database
    const { cap } = yield* (yield* ConversationLocks).localUsage
    const base = `http://${host}:${port}`
    yield* Effect.logInfo(`Conversation locks: at most ${cap} of ${poolMax} pool connections pinned`)
    yield* Effect.logInfo(`runlane listening on ${base}; try: curl ${base}/health/orchestrator (Ctrl-C stops)`)
    yield* Effect.addFinalizer(() => Effect.logInfo("runlane is shutting down"))
  }))

/**
 * The whole service. `extra` runs on top of the core services (tests use it to hold a lock); it is
 * closed before them, like the HTTP server.
 */
export const makeServiceLayer = <E>(extra: Layer.Layer<never, E, Layer.Success<typeof serviceCoreLayer>> = Layer.empty) =>
  Layer.unwrap(Effect.gen(function*() {
    const port = yield* Config.Port("PORT").pipe(Config.withDefault(defaultPort))
    const host = yield* Config.String("HOST").pipe(Config.withDefault(defaultHost))
    return Layer.mergeAll(httpServerLayer({ port, host }), announce(port, host), extra).pipe(
      Layer.provide(serviceCoreLayer)
    )
  }))
