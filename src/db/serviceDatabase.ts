/**
 * Which PostgreSQL the service (`npm start`, `npm run db:migrate`) uses: `DATABASE_URL` when set,
 * otherwise the embedded server whose data lives in `.runlane/pgdata` (git-ignored), so a restart
 * finds the same data again.
 */
import { fileURLToPath } from "node:url"
import { Config, Effect, Layer, Option, Redacted } from "effect"
import { Database, poolMaxConfig } from "./Database.ts"
import { startEmbeddedPostgres } from "./EmbeddedPostgres.ts"

export const embeddedDataDir = fileURLToPath(new URL("../../.runlane/pgdata", import.meta.url))

/** The URL without its password, for logs. */
export const describeUrl = (url: Redacted.Redacted<string>): string => {
  const parsed = new URL(Redacted.value(url))
  if (parsed.password !== "") parsed.password = "***"
  return parsed.toString()
}

/** `Database` for the service, plus a one-line description of where it points. */
export const serviceDatabaseLayer = Layer.unwrap(
  Effect.gen(function*() {
    const configured = yield* Config.option(Config.Redacted("DATABASE_URL"))
    const poolMax = yield* poolMaxConfig
    const url = Option.isSome(configured)
      ? configured.value
      : (yield* startEmbeddedPostgres({ dataDir: embeddedDataDir, persistent: true, database: "runlane", fsync: true })).url
    yield* Effect.logInfo(
      Option.isSome(configured)
        ? `Using DATABASE_URL ${describeUrl(url)}`
        : `Using embedded PostgreSQL at ${describeUrl(url)}, data in ${embeddedDataDir}`
    )
    return Database.layerWith({ url, poolMax })
  })
)
