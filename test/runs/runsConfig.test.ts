import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Effect } from "effect"
import { RunsConfigError } from "../../src/runs/runErrors.ts"
import { defaults, resolveRunsConfig, runsConfigFromEnvironment } from "../../src/runs/runsConfig.ts"

describe("runsConfig", () => {
  it("defaults to a 5-minute lease and a 60 s heartbeat", () => {
    const config = resolveRunsConfig({})
    assert.deepStrictEqual(config, { leaseMs: 300_000, heartbeatMs: 60_000, claimantPrefix: "runlane", now: undefined })
    assert.strictEqual(defaults.leaseMs, 300_000)
  })

  it("refuses a heartbeat longer than a third of the lease, naming both", () => {
    const error = resolveRunsConfig({ leaseMs: 1_000, heartbeatMs: 400 })
    assert.instanceOf(error, RunsConfigError)
    assert.strictEqual((error as RunsConfigError).setting, "heartbeatMs")
    assert.include((error as RunsConfigError).message, "leaseMs=1000")
  })

  it("refuses a lease that is not a positive whole number of milliseconds", () => {
    for (const leaseMs of [0, -5, 1.5, Number.NaN]) {
      const error = resolveRunsConfig({ leaseMs })
      assert.instanceOf(error, RunsConfigError)
      assert.strictEqual((error as RunsConfigError).setting, "leaseMs")
    }
  })

  const fromEnvironment = (env: Record<string, string>) =>
    runsConfigFromEnvironment.pipe(Effect.provide(ConfigProvider.layer(ConfigProvider.fromEnv({ env }))))

  it.effect("reads RUNLANE_RUN_LEASE_MS and RUNLANE_RUN_HEARTBEAT_MS, naming the variable that is wrong", () =>
    Effect.gen(function*() {
      const config = yield* fromEnvironment({ RUNLANE_RUN_LEASE_MS: "90000", RUNLANE_RUN_HEARTBEAT_MS: "30000" })
      assert.strictEqual(config.leaseMs, 90_000)
      assert.strictEqual(config.heartbeatMs, 30_000)
      const error = yield* Effect.flip(fromEnvironment({ RUNLANE_RUN_HEARTBEAT_MS: "200000" }))
      assert.instanceOf(error, RunsConfigError)
      assert.strictEqual((error as RunsConfigError).setting, "RUNLANE_RUN_HEARTBEAT_MS")
      const unparseable = yield* Effect.flip(fromEnvironment({ RUNLANE_RUN_LEASE_MS: "five minutes" }))
      assert.include(String(unparseable), "RUNLANE_RUN_LEASE_MS")
    }))
})
