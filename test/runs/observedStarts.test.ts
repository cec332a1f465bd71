import { assert, describe, it } from "@effect/vitest"
import { makeObservedStarts } from "../../src/runs/observedStarts.ts"

describe("observedStarts", () => {
  it("tells a run's first start once, however often it starts again", () => {
    const starts = makeObservedStarts(10)
    assert.isTrue(starts.firstStart(1))
    assert.isFalse(starts.firstStart(1))
    assert.isTrue(starts.firstStart(2))
    assert.isFalse(starts.firstStart(1))
    assert.isFalse(starts.firstStart(2))
  })

  it("remembers at least the latest half of its bound and forgets what came before the bound", () => {
    const limit = 1_000
    const starts = makeObservedStarts(limit)
    for (let id = 1; id <= 10_000; id++) assert.isTrue(starts.firstStart(id), `run ${id} is new`)
    // The latest limit / 2 runs are still known, whichever generation holds them.
    for (let id = 10_000 - limit / 2 + 1; id <= 10_000; id++) assert.isFalse(starts.firstStart(id), `run ${id} is remembered`)
    // Runs more than `limit` starts ago are forgotten: memory stays bounded.
    assert.isTrue(starts.firstStart(1))
    assert.isTrue(starts.firstStart(10_000 - limit - 1))
  })
})
