/**
 * Shared pieces of `npm run bench`: a database to measure on, timing, and the report.
 *
 * Every figure is measured side by side with its baseline in the same run on the same server, and the
 * two sides are interleaved in rounds so that drift (cache warm-up, autovacuum, CPU frequency) hits both.
 */
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
      fsync: false
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
