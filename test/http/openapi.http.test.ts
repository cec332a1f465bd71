/**
 * GET /openapi.json answers the document recorded in openapi.expected.json byte for byte: the
 * contract a client is generated from changes only on purpose. Recorded from main at 36ce75f, where
 * every route was served by HttpApiBuilder; the upload is now a plain router route that the document
 * must still describe.
 */
import { readFileSync } from "node:fs"
import { assert, layer } from "@effect/vitest"
import { Effect } from "effect"
import { TestServer, testServerLayer } from "../support/httpHarness.ts"

const expected = readFileSync(new URL("./openapi.expected.json", import.meta.url), "utf8")

layer(testServerLayer(), { excludeTestServices: true })("the OpenAPI document", (it) => {
  it.effect("is served unchanged, as JSON", () =>
    Effect.gen(function*() {
      const { baseUrl } = yield* TestServer
      const response = yield* Effect.promise(() => fetch(`${baseUrl}/openapi.json`))
      assert.strictEqual(response.status, 200)
      assert.strictEqual(response.headers.get("content-type"), "application/json")
      assert.strictEqual(yield* Effect.promise(() => response.text()), expected)
    }))
})
