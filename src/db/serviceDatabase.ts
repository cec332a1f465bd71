/**
 * Which PostgreSQL the service (`npm start`, `npm run db:migrate`) uses: `DATABASE_URL` when set,
 * otherwise the embedded server whose data lives in `<RUNLANE_DATA_DIR>/pgdata`, so a restart
 * finds the same data again.
 */
import { readdirSync, readFileSync, readlinkSync, realpathSync, rmSync } from "node:fs"
import { resolve } from "node:path"
import { fileURLToPath } from "node:url"
import { Config, Context, Effect, Layer, Option, Redacted } from "effect"
import { loadOrCreateSecret } from "../secrets/generatedSecret.ts"
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
/** The embedded server's superuser password, generated on first start (mode 600, never logged). */
export const embeddedPasswordFileOf = (stateDir: string): string => `${stateDir}/postgres-password`
/** 32 random bytes: as strong as the token secret. */
const passwordBytes = 32

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
  /** Fails when the embedded server dies under the service; never completes with DATABASE_URL. */
  readonly died: Effect.Effect<never, EmbeddedPostgresError>
}>()("runlane/ServiceDatabaseSource") {}

/** The pids of every process working in `dataDir`, or undefined where /proc cannot tell (not Linux). */
const processesIn = (dataDir: string): Array<number> | undefined => {
  let entries: Array<string>
  let target: string
  try {
    entries = readdirSync("/proc")
    target = realpathSync(dataDir)
  } catch {
    return undefined
  }
  return entries.filter((entry) => {
    if (!/^\d+$/.test(entry)) return false
    try {
      return readlinkSync(`/proc/${entry}/cwd`) === target
    } catch {
      // Gone, or another user's process (not ours: our server runs as us, or as `postgres` under root, who sees all).
      return false
    }
  }).map(Number)
}

const isAlive = (pid: number): boolean => {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    // EPERM: the process exists but belongs to another user (the server runs as `postgres` under root).
    return (error as NodeJS.ErrnoException).code === "EPERM"
  }
}

/**
 * Who holds the data folder: the pid of a live server that works in it, if any, and whether its
 * `postmaster.pid` is stale. PostgreSQL's postmaster and every backend run with the data folder as
 * their working directory, which is what tells a server from an unrelated process that got its pid
 * after a crash (pids are reused; in a container the new run's processes get the old numbers), which
 * PostgreSQL itself refuses to start over. Without /proc, any live pid counts as the owner.
 */
const dataDirOwner = (dataDir: string): { readonly owner: number | undefined; readonly stalePid: number | undefined } => {
  let pid: number
  try {
    pid = Number(readFileSync(`${dataDir}/postmaster.pid`, "utf8").split("\n")[0])
  } catch {
    return { owner: undefined, stalePid: undefined }
  }
  const working = processesIn(dataDir)
  if (working === undefined) return { owner: isAlive(pid) ? pid : undefined, stalePid: undefined }
  if (working.length > 0) return { owner: working.includes(pid) ? pid : working[0], stalePid: undefined }
  return { owner: undefined, stalePid: isAlive(pid) ? pid : undefined }
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
        Layer.succeed(ServiceDatabaseSource)({ embedded: false, died: Effect.never })
      )
    }
    const stateDir = yield* serviceStateDirConfig
    const embeddedDataDir = embeddedDataDirOf(stateDir)
    const { owner, stalePid } = dataDirOwner(embeddedDataDir)
    if (owner !== undefined) {
      return yield* new EmbeddedPostgresError({
        dataDir: embeddedDataDir,
        message: `the data folder ${embeddedDataDir} is in use by another server (pid ${owner}); ` +
          `is runlane already running? Stop it, or set DATABASE_URL`
      })
    }
    if (stalePid !== undefined) {
      yield* Effect.logWarning(
        `${embeddedDataDir}/postmaster.pid names pid ${stalePid}, which is not a PostgreSQL server of this data folder ` +
          `(left by a crash); removing it`
      )
      rmSync(`${embeddedDataDir}/postmaster.pid`, { force: true })
    }
    const passwordFile = embeddedPasswordFileOf(stateDir)
    const { secret } = yield* Effect.tryPromise({
      try: () => loadOrCreateSecret(passwordFile, passwordBytes),
      catch: (cause) =>
        new EmbeddedPostgresError({ dataDir: embeddedDataDir, message: `${passwordFile} could not be used: ${String(cause)}` })
    })
    const { url, died } = yield* startEmbeddedPostgres({
      dataDir: embeddedDataDir,
      persistent: true,
      database: "runlane",
      fsync: true,
      password: Redacted.make(secret)
    })
    yield* Effect.logInfo(`Using embedded PostgreSQL at ${describeUrl(url)}, data in ${embeddedDataDir}`)
    return Layer.merge(
      Database.layerWith({ url, poolMax }),
      Layer.succeed(ServiceDatabaseSource)({ embedded: true, died })
    )
  })
)
