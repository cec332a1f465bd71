import { assert, describe, it } from "@effect/vitest"
import { NearCapAlarm, nearCapRearmAt, nearCapThreshold, resolveLockCap } from "../../src/locks/lockCap.ts"
import { LockCounter } from "../../src/locks/lockCounter.ts"

const cap = (poolMax: number, override?: string) => {
  const result = resolveLockCap(poolMax, override)
  return result._tag === "Cap" ? result.cap : result.message
}

describe("lock cap", () => {
  it("defaults to max(1, DB_POOL_MAX - 5)", () => {
    assert.strictEqual(cap(20), 15)
    assert.strictEqual(cap(7), 2)
    assert.strictEqual(cap(6), 1)
    assert.strictEqual(cap(2), 1)
    assert.strictEqual(cap(20, ""), 15)
  })

  it("a pool of one has no safe default and says so", () => {
    assert.include(String(cap(1)), "DB_POOL_MAX=1")
    assert.strictEqual(cap(1, "0"), 0)
  })

  it("an override is a whole number below the pool; 0 drains", () => {
    assert.strictEqual(cap(20, "0"), 0)
    assert.strictEqual(cap(20, "1"), 1)
    assert.strictEqual(cap(20, "19"), 19)
    assert.strictEqual(cap(20, " 7 "), 7)
  })

  it("refuses anything else, naming the variable and the value", () => {
    for (const [value, words] of [
      ["20", "not below DB_POOL_MAX=20"],
      ["50", "not below"],
      ["-1", "negative"],
      ["abc", "not a whole number"],
      ["3.9", "not a whole number"],
      ["10abc", "not a whole number"],
      ["1e3", "not a whole number"]
    ] as const) {
      const message = String(cap(20, value))
      assert.include(message, "RUNLANE_MAX_RESERVED_LOCKS")
      assert.include(message, value)
      assert.include(message, words)
    }
  })

  it("warns at 80% of the cap, rounded up, and never for a cap of 0", () => {
    assert.strictEqual(nearCapThreshold(15), 12)
    assert.strictEqual(nearCapThreshold(1), 1)
    assert.strictEqual(nearCapThreshold(3), 3)
    assert.strictEqual(nearCapThreshold(0), Number.POSITIVE_INFINITY)
  })

  it("re-arms the near-cap warning at half the cap", () => {
    assert.strictEqual(nearCapRearmAt(1), 0)
    assert.strictEqual(nearCapRearmAt(6), 3)
    assert.strictEqual(nearCapRearmAt(15), 7)
  })
})

describe("near-cap alarm", () => {
  it("fires on the rise to the threshold, then only after falling to the re-arm level and the floor passing", () => {
    const alarm = new NearCapAlarm(6, 1_000)
    assert.isFalse(alarm.observe(4, true, 0))
    assert.isTrue(alarm.observe(5, true, 10))
    assert.isFalse(alarm.observe(6, true, 20))
    assert.isFalse(alarm.observe(4, false, 30)) // not clearly below yet
    assert.isFalse(alarm.observe(5, true, 2_000))
    assert.isFalse(alarm.observe(3, false, 2_010)) // re-armed
    assert.isTrue(alarm.observe(5, true, 2_020))
  })

  it("keeps quiet within the floor even when re-armed", () => {
    const alarm = new NearCapAlarm(1, 60_000)
    let warnings = 0
    for (let cycle = 0; cycle < 100; cycle++) {
      if (alarm.observe(1, true, cycle)) warnings++
      alarm.observe(0, false, cycle)
    }
    assert.strictEqual(warnings, 1)
    assert.isTrue(alarm.observe(1, true, 60_000))
  })

  it("never fires at cap 0", () => {
    assert.isFalse(new NearCapAlarm(0, 0).observe(0, true, 0))
  })
})

describe("lock counter", () => {
  it("counts in flight, held and stranded against the cap, and refuses without changing anything when full", () => {
    const counter = new LockCounter(2)
    assert.notStrictEqual(counter.enter(0), "full")
    counter.move("inFlight", "held")
    assert.notStrictEqual(counter.enter(0), "full")
    counter.move("inFlight", "stranded")
    assert.strictEqual(counter.enter(0), "full")
    assert.deepStrictEqual([counter.inFlight, counter.held, counter.stranded], [0, 1, 1])
    counter.leave("stranded", 0)
    counter.leave("held", 0)
    assert.strictEqual(counter.count, 0)
  })
})
