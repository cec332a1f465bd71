/**
 * `npm run db:backfill -- <name> [--batch-size=N] [--rate=N]`: runs a named backfill (see
 * backfills/Backfills.ts) from its checkpoint to the end, with a progress bar on stderr, and exits.
 * Stop it at any time (Ctrl-C, SIGKILL); running it again resumes after the last committed batch.
 * `--rate` is rows per second (0: no limit). Refuses to run while migrations are pending.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Effect } from "effect"
import { BackfillArgumentError, parseBackfillArguments } from "./backfills/backfillArguments.ts"
import { Backfills } from "./backfills/Backfills.ts"
import { progressLine } from "./terminal/progressLine.ts"
import { Migrator } from "./db/Migrator.ts"
import { serviceDatabaseLayer } from "./db/serviceDatabase.ts"

/** Repaints one line on a terminal; elsewhere (a log file) writes a line at most once a second. */
const progressWriter = () => {
  let lastLineAt = 0
  return (line: string, final: boolean) => {
    if (process.stderr.isTTY) {
      process.stderr.write(`\r${line}${final ? "\n" : ""}`)
    } else if (final || Date.now() - lastLineAt >= 1000) {
      lastLineAt = Date.now()
      process.stderr.write(`${line}\n`)
    }
  }
}

const program = Effect.gen(function*() {
  const parsed = parseBackfillArguments(process.argv.slice(2))
  if (parsed instanceof BackfillArgumentError) return yield* parsed
  const status = yield* (yield* Migrator).status
  if (status.pending.length > 0) {
    return yield* new BackfillArgumentError({
      argument: "database",
      message: `migrations pending (${status.pending.join(", ")}); run npm run db:migrate first`
    })
  }
  const write = progressWriter()
  const report = yield* (yield* Backfills).run(parsed.name, {
    batchSize: parsed.batchSize,
    rowsPerSecond: parsed.rowsPerSecond,
    onProgress: (progress) => write(progressLine(progress), false)
  })
  write(`${parsed.name}: finished, ${report.done} rows looked at, ${report.changed} changed, ${report.skipped} left untouched (no usable value)`, true)
})

NodeRuntime.runMain(program.pipe(
  Effect.provide(Backfills.layer),
  Effect.provide(Migrator.layer),
  Effect.provide(serviceDatabaseLayer)
))
