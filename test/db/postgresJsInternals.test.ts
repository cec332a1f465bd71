/**
 * The postgres.js internals runlane relies on (src/db/postgresJsInternals.ts). When an upgrade of
 * postgres.js changes any of them, this file fails, before pinned connections silently stop being safe.
 */
import { readFileSync } from "node:fs"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import postgres from "postgres"
import {
  applicationNameOf,
  backendPidOf,
  buildWithoutStackCapture,
  installConnectionHooks,
  testedPostgresJsVersion
} from "../../src/db/postgresJsInternals.ts"
import { acquireTestDatabase } from "../support/testDatabase.ts"

const installedVersion = (JSON.parse(readFileSync(new URL("../../node_modules/postgres/package.json", import.meta.url), "utf8")) as {
  version: string
}).version

const withPool = <A>(f: (sql: postgres.Sql, admin: postgres.Sql) => Promise<A>) =>
  Effect.gen(function*() {
    const database = yield* acquireTestDatabase
    return yield* Effect.promise(async () => {
      const sql = postgres(database.url, { max: 2, onnotice: () => {}, connection: { application_name: "internals-test" } })
      const admin = postgres(database.url, { max: 1, onnotice: () => {} })
      try {
        return await f(sql, admin)
      } finally {
        await sql.end({ timeout: 5 })
        await admin.end({ timeout: 5 })
      }
    })
  }).pipe(Effect.scoped)

describe("postgres.js internals", () => {
  it("the installed postgres.js is the version these internals were checked against", () => {
    assert.strictEqual(installedVersion, testedPostgresJsVersion)
  })

  it.live("the debug hook names the connection and its parameters; the close hook names the same connection", () =>
    withPool(async (sql, admin) => {
      const queried: Array<{ id: number; parameters: ReadonlyArray<unknown> }> = []
      const closed: Array<number> = []
      installConnectionHooks(sql, {
        onQuery: (id, parameters) => queried.push({ id, parameters }),
        onClose: (id) => closed.push(id)
      })
      const reserved = await sql.reserve()
      const [row] = await reserved<Array<{ pid: number }>>`select pg_backend_pid() as pid where ${"marker"}::text is not null`
      const seen = queried.find((q) => q.parameters[q.parameters.length - 1] === "marker")
      assert.isDefined(seen, "the debug hook saw the query's parameters")
      await admin`select pg_terminate_backend(${row!.pid})`
      const deadline = Date.now() + 5_000
      while (closed.length === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
      assert.deepStrictEqual(closed, [seen!.id], "the close hook named the same connection")
    }))

  it.live("a query knows its backend pid once handed to a connection; its handler has the debug switch", () =>
    withPool(async (sql) => {
      const reserved = await sql.reserve()
      const query = buildWithoutStackCapture(() => reserved<Array<{ pid: number }>>`select pg_backend_pid() as pid`)
      const handler = (query as unknown as { handler?: { debug?: unknown } }).handler
      assert.isFunction(handler)
      assert.strictEqual(handler!.debug, false)
      const [row] = await query
      assert.strictEqual(backendPidOf(query), row!.pid)
      reserved.release()
      assert.strictEqual(applicationNameOf(sql), "internals-test")
    }))
})
