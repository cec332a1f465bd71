/**
 * A migrator as its own OS process: `node --import tsx test/support/migrateProcess.ts <url> <folder>`.
 * Prints the tags it applied as one JSON line, then exits 0; exits 1 on any failure. It imports nothing
 * from vitest (it runs outside it), so it builds its Migrator here rather than through the harness.
 */
import { Effect, Layer, Redacted } from "effect"
import { Database } from "../../src/db/Database.ts"
import { Migrator } from "../../src/db/Migrator.ts"

const [url, folder] = process.argv.slice(2)

const program = Effect.gen(function*() {
  const migrator = yield* Migrator
  return yield* migrator.migrate
}).pipe(Effect.provide(Migrator.layerWith({ folder: folder! }).pipe(
  Layer.provide(Database.layerWith({ url: Redacted.make(url!), poolMax: 1 }))
)))

Effect.runPromise(program).then(
  (report) => process.stdout.write(`${JSON.stringify({ appliedNow: report.appliedNow })}\n`),
  (error: unknown) => {
    process.stderr.write(`${String(error)}\n`)
    process.exitCode = 1
  }
)
