import { assert, describe, it } from "@effect/vitest"
import { lockMetricsText } from "../../src/http/prometheusText.ts"

describe("lock metrics text", () => {
  it("counts stranded sessions as reserved and reports them as their own gauge", () => {
    const text = lockMetricsText({
      held: 2, inFlight: 1, stranded: 3, cap: 10, nearCap: false, oldestHoldMs: 1500,
      acquired: 7, busy: 1, capReached: 0, lost: 1
    })
    assert.match(text, /^runlane_conversation_locks_reserved 6$/m)
    assert.match(text, /^runlane_conversation_locks_stranded 3$/m)
    assert.match(text, /^# TYPE runlane_conversation_locks_stranded gauge$/m)
  })
})
