import { assert, describe, it } from "@effect/vitest"
import { nearCapThreshold, resolveLockCap } from "../../src/locks/lockCap.ts"

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
})
