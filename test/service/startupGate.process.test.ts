/**
 * The start-up gate: with RUNLANE_MIGRATE=false the service refuses to start while a migration is
 * pending and names it; by default it migrates and starts.
 */
import { assert, describe, it } from "vitest"
import { readJournal } from "../../src/db/Migrator.ts"
import { exitWithin, mainEntry, startService } from "../support/serviceProcess.ts"
import { createDatabase, dropDatabase } from "../support/testDatabase.ts"

const secret = "a-process-test-secret-of-32-bytes-or-more"

describe("the start-up gate", () => {
  it("RUNLANE_MIGRATE=false refuses to start with migrations pending, naming them; bad settings are named; the default migrates", async () => {
    const database = await createDatabase({ migrated: false })
    const env = (extra: Record<string, string> = {}) =>
      ({ DATABASE_URL: database.url, RUNLANE_TOKEN_SECRET: secret, PORT: "0", ...extra })
    const refused = startService(mainEntry, env({ RUNLANE_MIGRATE: "false" }))
    const badSettings = [
      ["RUNLANE_MIGRATE", "perhaps"],
      ["RUNLANE_MIGRATION_LOCK_TIMEOUT_MS", "0"],
      ["RUNLANE_MIGRATION_ATTEMPTS", "many"]
    ].map(([variable, value]) => ({ variable: variable!, service: startService(mainEntry, env({ [variable!]: value! })) }))
    const exit = await exitWithin(refused, 60_000)
    assert.notStrictEqual(exit.code, 0)
    for (const { variable, service } of badSettings) {
      assert.notStrictEqual((await exitWithin(service, 60_000)).code, 0, variable)
      assert.include(service.output(), variable, service.output())
      assert.notInclude(service.output(), "runlane listening")
    }
    const tags = readJournal().map((entry) => entry.tag)
    assert.include(refused.output(), `${tags.length} migration(s) pending: ${tags.join(", ")}`)
    assert.notInclude(refused.output(), "runlane listening")

    const migrating = startService(mainEntry, env())
    await migrating.waitFor(/runlane listening on/, 60_000)
    migrating.signal("SIGTERM")
    assert.strictEqual((await exitWithin(migrating, 30_000)).code, 0, migrating.output())

    const gated = startService(mainEntry, env({ RUNLANE_MIGRATE: "false" }))
    await gated.waitFor(/none pending \(RUNLANE_MIGRATE=false\)/, 60_000)
    await gated.waitFor(/runlane listening on/, 60_000)
    gated.signal("SIGTERM")
    assert.strictEqual((await exitWithin(gated, 30_000)).code, 0, gated.output())
    await dropDatabase(database.name)
  }, 180_000)
})
