/**
 * Shared pieces of `npm run bench`: a database to measure on, timing, and the report.
 *
 * Every figure is measured side by side with its baseline in the same run on the same server, and the
 * two sides are interleaved in rounds so that drift (cache warm-up, autovacuum, CPU frequency) hits both.
 */
import { readdirSync, readFileSync } from "node:fs"
import { chmod, mkdtemp } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Layer, Redacted, type Scope } from "effect"
import postgres from "postgres"
import { Database } from "../src/db/Database.ts"
import { startEmbeddedPostgres } from "../src/db/EmbeddedPostgres.ts"
import { Migrator } from "../src/db/Migrator.ts"

export interface BenchResult {
  readonly name: string
  readonly value: number
  readonly unit: string
  readonly baseline: number
  /** > 1 means runlane is better than the baseline, whatever the unit. */
  readonly ratio: number
  readonly note?: string
}

/** A fresh, migrated database on DATABASE_URL's server or on a throwaway embedded server. */
export const benchDatabase: Effect.Effect<{ url: string; server: string }, unknown, Scope.Scope> = Effect.gen(function*() {
  let serverUrl = process.env["DATABASE_URL"]
  let server = "DATABASE_URL"
  if (serverUrl === undefined || serverUrl === "") {
    const parent = yield* Effect.promise(() => mkdtemp(join(tmpdir(), "runlane-bench-")))
    yield* Effect.promise(() => chmod(parent, 0o755))
    const embedded = yield* startEmbeddedPostgres({
      dataDir: join(parent, "pgdata"),
      persistent: false,
      database: "postgres",
      fsync: false,
      // The default of 100 is too few for the conversation dispatch figure: its worker keeps one pinned
      // connection per conversation (200) in a pool of 216, beside the runs group's two pools of 16.
      settings: { max_connections: "300" }
    })
    serverUrl = Redacted.value(embedded.url)
    server = "embedded PostgreSQL (fsync off)"
  }
  const name = `runlane_bench_${process.pid}`
  const url = new URL(serverUrl)
  url.pathname = `/${name}`
  yield* Effect.acquireRelease(
    Effect.promise(async () => {
      const admin = postgres(serverUrl, { max: 1, onnotice: () => {} })
      await admin`drop database if exists ${admin(name)} with (force)`
      await admin`create database ${admin(name)}`
      await admin.end()
    }),
    () =>
      Effect.promise(async () => {
        const admin = postgres(serverUrl, { max: 1, onnotice: () => {} })
        await admin`drop database if exists ${admin(name)} with (force)`
        await admin.end()
      })
  )
  yield* Effect.gen(function*() {
    const migrator = yield* Migrator
    yield* migrator.migrate
  }).pipe(Effect.provide(Migrator.layer.pipe(Layer.provide(Database.layerWith({ url: Redacted.make(url.toString()), poolMax: 1 })))))
  return { url: url.toString(), server }
})

/**
 * CPU milliseconds used so far by every process named `postgres` on this machine (user + system, from
 * /proc), or undefined where that cannot be read or the server is not on this machine. The difference
 * over a measurement is the server's CPU for it, background work (autovacuum, checkpoints) included.
 */
export const localPostgresCpuMs = (url: string): number | undefined => {
  const host = new URL(url).hostname
  if (!["127.0.0.1", "localhost", "::1", "[::1]", ""].includes(host)) return undefined
  let entries: Array<string>
  try {
    entries = readdirSync("/proc")
  } catch {
    return undefined
  }
  let ticks = 0
  for (const pid of entries) {
    if (!/^\d+$/.test(pid)) continue
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8")
      const close = stat.lastIndexOf(")")
      if (!stat.slice(stat.indexOf("(") + 1, close).startsWith("postgres")) continue
      // Fields after the command: state is the 3rd field of the line, utime the 14th, stime the 15th.
      const fields = stat.slice(close + 2).split(" ")
      ticks += Number(fields[11]) + Number(fields[12])
    } catch {
      // The process ended between listing and reading.
    }
  }
  // Linux reports CPU time in clock ticks of 10 ms (USER_HZ = 100 on every architecture Node runs on).
  return ticks * 10
}

export const now = (): number => Number(process.hrtime.bigint()) / 1e6

export const median = (values: ReadonlyArray<number>): number => {
  const sorted = [...values].sort((a, b) => a - b)
  const middle = Math.floor(sorted.length / 2)
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2
}

/** Milliseconds one call of `f` takes. */
export const time = async (f: () => Promise<unknown>): Promise<number> => {
  const start = now()
  await f()
  return now() - start
}

export const printTable = (results: ReadonlyArray<BenchResult>): void => {
  const rows = results.map((r) => [
    r.name,
    `${r.value.toFixed(r.value < 10 ? 3 : 1)} ${r.unit}`,
    `${r.baseline.toFixed(r.baseline < 10 ? 3 : 1)} ${r.unit}`,
    r.ratio.toFixed(2),
    r.note ?? ""
  ])
  const header = ["benchmark", "runlane", "baseline", "ratio", "note"]
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)))
  const line = (cells: ReadonlyArray<string>) => cells.map((cell, i) => cell.padEnd(widths[i]!)).join("  ")
  process.stdout.write(`${line(header)}\n${widths.map((w) => "-".repeat(w)).join("  ")}\n`)
  for (const row of rows) process.stdout.write(`${line(row)}\n`)
}
