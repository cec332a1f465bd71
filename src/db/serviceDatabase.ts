/**
 * Which PostgreSQL the service (`npm start`, `npm run db:migrate`) uses: `DATABASE_URL` when set,
 * otherwise the embedded server whose data lives in `<RUNLANE_DATA_DIR>/pgdata`, so a restart
 * finds the same data again.
 */
import { readFileSync } from "node:fs"
import { resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Config, Context, Effect, Layer, Option, Redacted } from "effect"
import { Database, poolMaxConfig } from "./Database.ts"
import { EmbeddedPostgresError, startEmbeddedPostgres } from "./EmbeddedPostgres.ts"

/**
 * Everything `npm start` keeps on disk: the embedded cluster (`pgdata/`) and, when generated, the token
 * secret. RUNLANE_DATA_DIR moves it; by default it is `.runlane/` in the project (git-ignored).
 */
export const defaultServiceStateDir = fileURLToPath(new URL("../../.runlane", import.meta.url))
export const serviceStateDirConfig = Config.String("RUNLANE_DATA_DIR").pipe(
  Config.withDefault(defaultServiceStateDir),
  Config.map((dir) => resolve(dir))
)
export const embeddedDataDirOf = (stateDir: string): string => `${stateDir}/pgdata`

/** The URL without its password, for logs. */
export const describeUrl = (url: Redacted.Redacted<string>): string => {
  const parsed = new URL(Redacted.value(url))
  if (parsed.password !== "") parsed.password = "***"
  return parsed.toString()
}

/** Where the service's database came from. */
export class ServiceDatabaseSource extends Context.Service<ServiceDatabaseSource, {
  /** true: the embedded server in `embeddedDataDir`; false: `DATABASE_URL`. */
  readonly embedded: boolean
}>()("runlane/ServiceDatabaseSource") {}

/**
 * The pid of a live postmaster that owns the data folder, if any. PostgreSQL refuses a second server
 * on the same folder anyway; checking first lets the service say so plainly.
 */
const liveOwnerOf = (dataDir: string): number | undefined => {
  let pid: number
  try {
    pid = Number(readFileSync(`${dataDir}/postmaster.pid`, "utf8").split("\n")[0])
  } catch {
    return undefined
  }
  if (!Number.isSafeInteger(pid) || pid <= 0) return undefined
  try {
    process.kill(pid, 0)
    return pid
  } catch (error) {
    // EPERM: the process exists but belongs to another user (the server runs as `postgres` under root).
    return (error as NodeJS.ErrnoException).code === "EPERM" ? pid : undefined
  }
}

/** `Database` for the service, and where it points. */
export const serviceDatabaseLayer = Layer.unwrap(
  Effect.gen(function*() {
    const configured = yield* Config.option(Config.Redacted("DATABASE_URL"))
    const poolMax = yield* poolMaxConfig
    if (Option.isSome(configured)) {
      yield* Effect.logInfo(`Using DATABASE_URL ${describeUrl(configured.value)}`)
      return Layer.merge(
        Database.layerWith({ url: configured.value, poolMax }),
        Layer.succeed(ServiceDatabaseSource)({ embedded: false })
      )
    }
    const embeddedDataDir = embeddedDataDirOf(yield* serviceStateDirConfig)
    const owner = liveOwnerOf(embeddedDataDir)
    if (owner !== undefined) {
      return yield* new EmbeddedPostgresError({
        dataDir: embeddedDataDir,
        message: `the data folder ${embeddedDataDir} is in use by another server (pid ${owner}); ` +
          `is runlane already running? Stop it, or set DATABASE_URL`
      })
    }
    const { url } = yield* startEmbeddedPostgres({
      dataDir: embeddedDataDir,
      persistent: true,
      database: "runlane",
      fsync: true
    })
    yield* Effect.logInfo(`Using embedded PostgreSQL at ${describeUrl(url)}, data in ${embeddedDataDir}`)
    return Layer.merge(Database.layerWith({ url, poolMax }), Layer.succeed(ServiceDatabaseSource)({ embedded: true }))
  })
)
