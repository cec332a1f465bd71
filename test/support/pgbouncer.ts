/**
 * A real PgBouncer (Debian's `pgbouncer` package, which .ci/run installs) in front of the test server,
 * in the pool mode a test asks for. It listens on a free loopback port and is stopped with its scope.
 * As root it runs as `postgres` (PgBouncer refuses to run as root).
 */
import { spawn } from "node:child_process"
import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises"
import net from "node:net"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"

export const pgbouncerBinary = "/usr/sbin/pgbouncer"

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const server = net.createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port
      server.close(() => resolve(port))
    })
  })

const accepting = (port: number) =>
  new Promise<boolean>((resolve) => {
    const socket = net.connect(port, "127.0.0.1")
    socket.once("connect", () => (socket.destroy(), resolve(true)))
    socket.once("error", () => resolve(false))
  })

/** Scoped: PgBouncer in `poolMode` in front of `serverUrl`'s server; answers the same URL through it. */
export const startPgbouncer = (serverUrl: string, poolMode: "session" | "transaction") =>
  Effect.gen(function*() {
    const server = new URL(serverUrl)
    const dir = yield* Effect.acquireRelease(
      Effect.promise(() => mkdtemp(join(tmpdir(), "runlane-pgbouncer-"))),
      (path) => Effect.promise(() => rm(path, { recursive: true, force: true }))
    )
    const port = yield* Effect.promise(freePort)
    const user = decodeURIComponent(server.username || "postgres")
    const password = decodeURIComponent(server.password)
    const config = [
      "[databases]",
      `* = host=${server.hostname === "localhost" ? "127.0.0.1" : server.hostname} port=${server.port || 5432} user=${user}` +
      (password === "" ? "" : ` password=${password}`),
      "[pgbouncer]",
      "listen_addr = 127.0.0.1",
      `listen_port = ${port}`,
      "auth_type = trust",
      `auth_file = ${join(dir, "userlist.txt")}`,
      `pool_mode = ${poolMode}`,
      "default_pool_size = 10",
      "max_client_conn = 200",
      "unix_socket_dir =",
      "ignore_startup_parameters = extra_float_digits"
    ].join("\n")
    yield* Effect.promise(async () => {
      await chmod(dir, 0o755)
      await writeFile(join(dir, "pgbouncer.ini"), config, { mode: 0o644 })
      await writeFile(join(dir, "userlist.txt"), `"${user}" ""\n`, { mode: 0o644 })
    })
    const asRoot = process.getuid?.() === 0
    const child = yield* Effect.acquireRelease(
      Effect.sync(() =>
        spawn(pgbouncerBinary, [...(asRoot ? ["-u", "postgres"] : []), join(dir, "pgbouncer.ini")], { stdio: ["ignore", "ignore", "pipe"] })
      ),
      (process) =>
        Effect.callback<void>((resume) => {
          if (process.exitCode !== null || process.signalCode !== null) return resume(Effect.void)
          process.once("exit", () => resume(Effect.void))
          process.kill("SIGTERM")
        })
    )
    // PgBouncer logs to stderr when it has no logfile; kept for the error message if it fails to start.
    let log = ""
    child.stderr!.on("data", (chunk: Buffer) => (log += chunk.toString()))
    const deadline = Date.now() + 10_000
    while (!(yield* Effect.promise(() => accepting(port)))) {
      if (child.exitCode !== null) return yield* Effect.die(new Error(`pgbouncer exited with ${child.exitCode}: ${log}`))
      if (Date.now() > deadline) return yield* Effect.die(new Error("pgbouncer did not start listening within 10 s"))
      yield* Effect.sleep(20)
    }
    const through = new URL(serverUrl)
    through.hostname = "127.0.0.1"
    through.port = String(port)
    return through.toString()
  })
