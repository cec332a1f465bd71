/**
 * `npm run bench`: prints a table; `npm run bench -- --json` prints a JSON array of
 * `{ name, value, unit, baseline, ratio }` instead; `-- --only=runs|locks|http|memory` runs one group.
 * `-- --only=migrations` (a schema change on 1,000,000 runs under load, minutes long) runs only when asked.
 * stdout carries only the table or the JSON; every log line goes to stderr.
 */
import { Effect, Logger } from "effect"
import { benchDatabase, printTable } from "./harness.ts"
import { httpBenchmarks } from "./http.ts"
import { lockBenchmarks } from "./locks.ts"
import { memoryBenchmarks } from "./memory.ts"
import { migrationBenchmarks } from "./migrations.ts"
import { runsBenchmarks } from "./runs.ts"

const json = process.argv.includes("--json")

const program = Effect.gen(function*() {
  const { url, server } = yield* benchDatabase
  const only = process.argv.find((arg) => arg.startsWith("--only="))?.slice("--only=".length)
  const results = [
    ...(only === undefined || only === "runs" ? yield* runsBenchmarks(url) : []),
    ...(only === undefined || only === "locks" ? yield* lockBenchmarks(url) : []),
    ...(only === undefined || only === "http" ? yield* httpBenchmarks(url) : []),
    ...(only === undefined || only === "memory" ? yield* memoryBenchmarks(url) : []),
    ...(only === "migrations" ? yield* migrationBenchmarks(url) : [])
  ]
  if (json) {
    process.stdout.write(`${JSON.stringify(results.map(({ name, value, unit, baseline, ratio }) => ({ name, value, unit, baseline, ratio })), null, 2)}\n`)
  } else {
    process.stdout.write(`runlane benchmarks on ${server}, Node ${process.version}\n\n`)
    printTable(results)
  }
}).pipe(Effect.scoped, Effect.provideService(Logger.LogToStderr, true))

Effect.runPromise(program).catch((error: unknown) => {
  process.stderr.write(`${String(error)}\n`)
  process.exitCode = 1
})
