import { describe, expect, it } from "vitest"
import { type Groupable, nextGroup } from "../../src/snapshots/uploadGrouping.ts"

const upload = (runId: number, bytes = 10, alone = false): Groupable & { readonly name: string } => ({
  name: `${runId}${alone ? " alone" : ""}`,
  row: { runId, bytes },
  alone
})
const names = (uploads: ReadonlyArray<{ readonly name: string }>) => uploads.map((u) => u.name)
const limits = { maxRowsPerStatement: 100, maxBytesPerStatement: 1_000 }

describe("nextGroup", () => {
  it("takes one upload per run, rows in ascending run id; the rest stays queued in its order", () => {
    const { group, left } = nextGroup([upload(3), upload(1), upload(2), upload(1), upload(3)], new Set(), limits)
    expect(names(group)).toEqual(["1", "2", "3"])
    expect(names(left)).toEqual(["1", "3"])
  })

  it("holds back every upload whose run has a statement in flight", () => {
    const { group, left } = nextGroup([upload(1), upload(2), upload(3)], new Set([2]), limits)
    expect(names(group)).toEqual(["1", "3"])
    expect(names(left)).toEqual(["2"])
    expect(nextGroup([upload(2)], new Set([2]), limits).group).toEqual([])
  })

  it("keeps to the row and byte bounds; a single larger upload still goes alone", () => {
    const small = { maxRowsPerStatement: 2, maxBytesPerStatement: 25 }
    expect(names(nextGroup([upload(1), upload(2), upload(3)], new Set(), small).group)).toEqual(["1", "2"])
    expect(names(nextGroup([upload(1, 20), upload(2, 10), upload(3, 5)], new Set(), small).group)).toEqual(["1", "3"])
    expect(names(nextGroup([upload(1, 500), upload(2)], new Set(), small).group)).toEqual(["1"])
  })

  it("an upload marked alone goes in a statement of its own, and only first", () => {
    expect(names(nextGroup([upload(5, 10, true), upload(1)], new Set(), limits).group)).toEqual(["5 alone"])
    const { group, left } = nextGroup([upload(1), upload(5, 10, true), upload(2)], new Set(), limits)
    expect(names(group)).toEqual(["1", "2"])
    expect(names(left)).toEqual(["5 alone"])
  })
})
