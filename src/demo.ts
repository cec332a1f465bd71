/**
 * `npm run demo`: a workload through runlane's HTTP API, a progress bar on stderr, then a summary.
 *
 * Without RUNLANE_URL it starts its own service in this process (as `npm start` would: the database
 * from DATABASE_URL, or an embedded one in a temporary folder removed afterwards) working the queue
 * `demo`. With RUNLANE_URL it drives that service instead, which must work the queue given by
 * `--queue=` (default `demo`, what `npm start` works), with RUNLANE_ADMIN_TOKEN its admin token and
 * DATABASE_URL its database (the audit reads the runs there).
 *
 * Options: --runs=2000 --conversations=200 --work-ms=50 --fail-every=50 (every 50th run fails its
 * first attempt; 0 for none) --concurrency=10 (own service only) --timeout-s=600.
 * Exit code 0 when every check held, 1 otherwise.
 */
import { randomBytes } from "node:crypto"
import { rm } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Context, Effect, Layer, Logger, References, Schema } from "effect"
import { HttpServer } from "effect/http"
import postgres from "postgres"
import { type DemoOptions, runDemoWorkload } from "./demo/demoWorkload.ts"
import { summaryText } from "./demo/demoReport.ts"
import { Database } from "./db/Database.ts"
import { makeServiceLayer } from "./service.ts"
import { progressLine } from "./terminal/progressLine.ts"

export class DemoArgumentError extends Schema.TaggedError<DemoArgumentError>()("DemoArgumentError", {
  argument: Schema.String,
  message: Schema.String
}) {}

const argument = (name: string, fallback: number, min: number, max: number) =>
  Effect.gen(function*() {
    const given = process.argv.find((arg) => arg.startsWith(`--${name}=`))?.slice(name.length + 3)
    if (given === undefined) return fallback
    const value = Number(given)
    if (!Number.isInteger(value) || value < min || value > max) {
      return yield* new DemoArgumentError({ argument: `--${name}`, message: `--${name} must be a whole number from ${min} to ${max}, got "${given}"` })
    }
    return value
  })

const requiredVariable = (name: string) =>
  Effect.gen(function*() {
    const value = process.env[name]
    if (value === undefined || value === "") {
      return yield* new DemoArgumentError({ argument: name, message: `${name} must be set when RUNLANE_URL is (see src/demo.ts)` })
    }
    return value
  })

const showProgress = (progress: { finished: number; total: number; elapsedMs: number }) => {
  if (process.stderr.isTTY) process.stderr.write(`\r${progressLine({ done: progress.finished, total: progress.total, elapsedMs: progress.elapsedMs, unit: "runs" })}`)
}

const drive = (options: DemoOptions, sql: postgres.Sql) =>
      Effect.promise(async () => {
        let lastShown = 0
        const summary = await runDemoWorkload(options, sql, (progress) => {
          // Without a terminal, a line every 5 s instead of a redrawn bar.
          if (process.stderr.isTTY) showProgress(progress)
          else if (progress.elapsedMs - lastShown >= 5_000 || progress.finished === progress.total) {
            lastShown = progress.elapsedMs
            process.stderr.write(`${progressLine({ done: progress.finished, total: progress.total, elapsedMs: progress.elapsedMs, unit: "runs" })}\n`)
          }
        })
        if (process.stderr.isTTY) process.stderr.write("\n")
        return summary
      })

const program = Effect.gen(function*() {
  const runs = yield* argument("runs", 2_000, 1, 1_000_000)
  const conversations = yield* argument("conversations", 200, 1, 100_000)
  const workMs = yield* argument("work-ms", 50, 0, 60_000)
  const failEvery = yield* argument("fail-every", 50, 0, 1_000_000)
  const concurrency = yield* argument("concurrency", 10, 1, 1_000)
  const timeoutMs = (yield* argument("timeout-s", 600, 1, 86_400)) * 1_000
  const queueArgument = process.argv.find((arg) => arg.startsWith("--queue="))?.slice("--queue=".length)
  const common = { runs, conversations, workMs, failEvery, timeoutMs }

  const url = process.env["RUNLANE_URL"]
  if (url !== undefined && url !== "") {
    const options = { ...common, baseUrl: url.replace(/\/$/, ""), adminToken: yield* requiredVariable("RUNLANE_ADMIN_TOKEN"), queue: queueArgument ?? "demo" }
    process.stderr.write(`Driving ${options.baseUrl}: ${runs} runs over ${conversations} conversations on queue "${options.queue}"\n`)
    const databaseUrl = yield* requiredVariable("DATABASE_URL")
    const sql = yield* Effect.acquireRelease(
      Effect.sync(() => postgres(databaseUrl, { max: 2, onnotice: () => {} })),
      (client) => Effect.promise(() => client.end({ timeout: 5 }))
    )
    return yield* drive(options, sql)
  }

  // Its own service: an admin token of its own, any free port, an embedded database in a folder of its own.
  const queue = queueArgument ?? "demo"
  const adminToken = randomBytes(24).toString("base64url")
  const dataDir = process.env["DATABASE_URL"] === undefined
    // A path that does not exist yet: the service creates it as `npm start` creates `.runlane`
    // (owned by the postgres user when run as root).
    ? yield* Effect.acquireRelease(
      Effect.sync(() => join(tmpdir(), `runlane-demo-${randomBytes(6).toString("hex")}`)),
      (dir) => Effect.promise(() => rm(dir, { recursive: true, force: true }))
    )
    : undefined
  Object.assign(process.env, {
    PORT: "0",
    HOST: "127.0.0.1",
    RUNLANE_ADMIN_TOKEN: adminToken,
    RUNLANE_WORKER: "demo",
    RUNLANE_WORKER_QUEUE: queue,
    RUNLANE_WORKER_CONCURRENCY: String(concurrency),
    ...(dataDir === undefined ? {} : { RUNLANE_DATA_DIR: dataDir })
  })
  process.stderr.write(`Starting a runlane service (${dataDir === undefined ? "DATABASE_URL" : "embedded PostgreSQL"}), then ${runs} runs over ${conversations} conversations\n`)
  const services = yield* Layer.build(makeServiceLayer())
  const baseUrl = HttpServer.formatAddress(Context.get(services, HttpServer.HttpServer).address)
  return yield* drive({ ...common, baseUrl, adminToken, queue }, Context.get(services, Database).sql)
})

Effect.runPromise(program.pipe(
  Effect.map(summaryText),
  Effect.scoped,
  // The service's own log lines would break the progress bar: only its warnings, on stderr.
  Effect.provideService(References.MinimumLogLevel, "Warn"),
  Effect.provideService(Logger.LogToStderr, true)
)).then(({ text, ok }) => {
  process.stdout.write(text)
  process.exitCode = ok ? 0 : 1
}, (error: unknown) => {
  process.stderr.write(`\nnpm run demo: ${error instanceof Error ? error.message : String(error)}\n`)
  process.exitCode = 1
})
