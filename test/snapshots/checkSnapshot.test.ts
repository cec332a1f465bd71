/**
 * checkSnapshot's storable-text check (U+0000 or a lone UTF-16 surrogate refused) against the regular
 * expression it replaced, on strings made mostly of surrogates, NUL and their neighbours.
 */
import { assert, describe, it } from "@effect/vitest"
import fc from "fast-check"
import { checkSnapshot } from "../../src/snapshots/TranscriptSnapshots.ts"

const formerCheck = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

const codeUnit = fc.oneof(
  fc.constantFrom(0x0000, 0x0001, 0x0041, 0xd7ff, 0xd800, 0xdbff, 0xdc00, 0xdfff, 0xe000, 0xffff),
  fc.integer({ min: 0xd800, max: 0xdfff }),
  fc.integer({ min: 0, max: 0xffff })
)
const text = fc.array(codeUnit, { minLength: 1, maxLength: 12 }).map((units) => String.fromCharCode(...units))

const refusedAsUnstorable = (snapshotJsonl: string) => {
  const checked = checkSnapshot({ runId: 1, terminalStatus: "completed", snapshotJsonl })
  return checked._tag === "InvalidSnapshot" && checked.field === "snapshotJsonl"
}

describe("checkSnapshot", () => {
  it("refuses exactly the text the former regular expression refused", () => {
    fc.assert(fc.property(text, (snapshotJsonl) => refusedAsUnstorable(snapshotJsonl) === formerCheck.test(snapshotJsonl)), {
      numRuns: 20_000
    })
    for (const [snapshotJsonl, refused] of [
      ["\uD83D\uDE42", false],
      ["\uDE42\uD83D", true],
      ["x\uD83D", true],
      ["\uDE42x", true],
      ["a\u0000", true]
    ] as const) {
      assert.strictEqual(refusedAsUnstorable(snapshotJsonl), refused, JSON.stringify(snapshotJsonl))
    }
  })
})
