import { assert, describe, it } from "@effect/vitest"
import { DatabaseError, isRetryableCode } from "../../src/db/DatabaseError.ts"

describe("DatabaseError classification", () => {
  it("retries serialization failures, deadlocks, lock timeouts, cancels, shutdowns and lost connections", () => {
    for (const code of ["40001", "40P01", "55P03", "57014", "57P01", "08006", "08001", "53300", "ECONNRESET", "CONNECTION_CLOSED"]) {
      assert.isTrue(isRetryableCode(code), code)
    }
  })

  it("does not retry what the same input will always hit", () => {
    for (const code of ["23505", "23503", "23514", "22P02", "42601", "42P01", "XX000", undefined, "nonsense"]) {
      assert.isFalse(isRetryableCode(code), String(code))
    }
  })

  it("finds the SQLSTATE through drizzle's wrapper and keeps the driver's message", () => {
    const driverError = Object.assign(new Error("duplicate key value violates unique constraint"), { code: "23505" })
    const drizzleError = Object.assign(new Error("Failed query: insert ..."), { cause: driverError })
    const error = DatabaseError.fromCause("Test.op", drizzleError)
    assert.strictEqual(error.sqlState, "23505")
    assert.isFalse(error.retryable)
    assert.strictEqual(error.operation, "Test.op")
    assert.strictEqual(error.message, "duplicate key value violates unique constraint")
  })

  it("a client-side code is retryable but is not reported as a SQLSTATE", () => {
    const error = DatabaseError.fromCause("Test.op", Object.assign(new Error("write CONNECTION_CLOSED"), { code: "CONNECTION_CLOSED" }))
    assert.isUndefined(error.sqlState)
    assert.isTrue(error.retryable)
  })
})
