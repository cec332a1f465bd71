/**
 * A database of its own for each test file, cloned from the migrated template made by globalSetup.
 */
import { randomBytes } from "node:crypto"
import { Effect, Layer, Redacted } from "effect"
import postgres from "postgres"
import { inject } from "vitest"
import { Database } from "../../src/db/Database.ts"
import { databaseUrl, testDatabasePrefix } from "./databaseNames.ts"


export interface TestDatabaseHandle {
  readonly name: string
  readonly url: string
}

const withAdmin = async <A>(f: (admin: postgres.Sql) => Promise<A>): Promise<A> => {
  const admin = postgres(inject("adminUrl"), { max: 1, onnotice: () => {} })
  try {
    return await f(admin)
  } finally {
    await admin.end({ timeout: 5 })
  }
}

/** A fresh database: migrated (a clone of the template) or empty (for migration tests). */
export const createDatabase = (options: { readonly migrated: boolean }): Promise<TestDatabaseHandle> =>
  withAdmin(async (admin) => {
    const name = `${testDatabasePrefix}${randomBytes(6).toString("hex")}`
    const template = options.migrated ? inject("templateDatabase") : "template0"
    await admin`create database ${admin(name)} template ${admin(template)}`
    return { name, url: databaseUrl(inject("adminUrl"), name) }
  })

export const dropDatabase = (name: string): Promise<void> =>
  withAdmin(async (admin) => {
    await admin`drop database if exists ${admin(name)} with (force)`
  })

/** Scoped: a migrated database for the life of the layer, dropped afterwards. */
export const acquireTestDatabase = Effect.acquireRelease(
  Effect.promise(() => createDatabase({ migrated: true })),
  (handle) => Effect.promise(() => dropDatabase(handle.name))
)

/** `Database` over a fresh migrated database. */
export const testDatabaseLayer = (options: { readonly poolMax?: number } = {}) =>
  Layer.unwrap(
    Effect.map(acquireTestDatabase, (handle) =>
      Database.layerWith({ url: Redacted.make(handle.url), poolMax: options.poolMax ?? 10 }))
  )
