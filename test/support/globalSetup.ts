/**
 * Starts the PostgreSQL every test file uses and migrates a template database once.
 *
 * `DATABASE_URL` set: that server is used (its user must be allowed to create databases).
 * Otherwise a throwaway embedded server is started in a temporary folder and deleted afterwards.
 * Each test file then clones the template (see testDatabase.ts), which takes milliseconds.
 * It also builds the service as `npm start` does, once, so process tests run what `npm start` serves.
 */
import { execFileSync } from "node:child_process"
import { chmod, mkdtemp } from "node:fs/promises"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect, Exit, Layer, Redacted, Scope } from "effect"
import postgres from "postgres"
import type { TestProject } from "vitest/node"
import { Database } from "../../src/db/Database.ts"
import { startEmbeddedPostgres } from "../../src/db/EmbeddedPostgres.ts"
import { Migrator } from "../../src/db/Migrator.ts"
import { databaseUrl, testDatabasePrefix } from "./databaseNames.ts"
import { projectRoot } from "./serviceProcess.ts"

declare module "vitest" {
  export interface ProvidedContext {
    adminUrl: string
    templateDatabase: string
  }
}

export default async function setup(project: TestProject) {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: projectRoot, stdio: "inherit" })
  const scope = Effect.runSync(Scope.make())
  let adminUrl = process.env["DATABASE_URL"]
  if (adminUrl === undefined || adminUrl === "") {
    const parent = await mkdtemp(join(tmpdir(), "runlane-test-"))
    // mkdtemp makes the folder 0700; as root, the server runs as `postgres` and must be able to enter it.
    await chmod(parent, 0o755)
    const dataDir = join(parent, "pgdata")
    const server = await Effect.runPromise(
      startEmbeddedPostgres({ dataDir, persistent: false, database: "postgres", fsync: false }).pipe(Scope.provide(scope))
    )
    adminUrl = Redacted.value(server.url)
  }
  const templateDatabase = `${testDatabasePrefix}template_${process.pid}`
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} })
  await admin`drop database if exists ${admin(templateDatabase)} with (force)`
  await admin`create database ${admin(templateDatabase)}`
  await Effect.runPromise(
    Effect.gen(function*() {
      const migrator = yield* Migrator
      return yield* migrator.migrate
    }).pipe(
      Effect.provide(Migrator.layer.pipe(
        Layer.provide(Database.layerWith({ url: Redacted.make(databaseUrl(adminUrl, templateDatabase)), poolMax: 1 }))
      ))
    )
  )
  project.provide("adminUrl", adminUrl)
  project.provide("templateDatabase", templateDatabase)

  return async () => {
    const leftovers = await admin<Array<{ datname: string }>>`
      select datname from pg_database where datname like ${`${testDatabasePrefix}%`}`
    for (const { datname } of leftovers) await admin`drop database if exists ${admin(datname)} with (force)`
    await admin.end({ timeout: 5 })
    await Effect.runPromise(Scope.close(scope, Exit.void))
  }
}
