/**
 * RunsQueue's settings: their defaults, the one check that decides whether a combination can work, and
 * how they are read from the environment.
 */
import { Config, Effect } from "effect"
import { RunsConfigError } from "./runErrors.ts"

export interface RunsQueueOptions {
  /** How long a claim lasts without a heartbeat before the sweep may take it back. Defaults to 300,000 ms (5 minutes). */
  readonly leaseMs?: number | undefined
  /** How often a worker heartbeats its claimed runs; at most a third of `leaseMs`. Defaults to 60,000 ms. */
  readonly heartbeatMs?: number | undefined
  /** Start of the claimant id, before a per-process UUID. Defaults to "runlane". */
  readonly claimantPrefix?: string | undefined
  /**
   * The clock of claims, settles, the sweep and stats. Defaults to the database's now(), the one clock
   * every process shares; tests pass a function to move time without waiting.
   */
  readonly now?: (() => Date) | undefined
}

export interface RunsConfig {
  readonly leaseMs: number
  readonly heartbeatMs: number
  readonly claimantPrefix: string
  readonly now: (() => Date) | undefined
}

export const defaults = { leaseMs: 300_000, heartbeatMs: 60_000, claimantPrefix: "runlane" } as const

/**
 * A lease must survive two missed heartbeats: one lost to a slow handler tick, one to a slow database.
 * So the heartbeat is at most a third of the lease (5 minutes and 60 s by default leave five).
 */
export const heartbeatsPerLease = 3

const maxMs = 86_400_000

/** Merges options over the defaults, or names the first setting that cannot work. */
export const resolveRunsConfig = (options: RunsQueueOptions, names = optionNames): RunsConfig | RunsConfigError => {
  const leaseMs = options.leaseMs ?? defaults.leaseMs
  const heartbeatMs = options.heartbeatMs ?? defaults.heartbeatMs
  const claimantPrefix = options.claimantPrefix ?? defaults.claimantPrefix
  for (const [setting, value] of [[names.leaseMs, leaseMs], [names.heartbeatMs, heartbeatMs]] as const) {
    if (!Number.isInteger(value) || value < 1 || value > maxMs) {
      return new RunsConfigError({ setting, message: `${setting}=${value} must be a whole number of milliseconds from 1 to ${maxMs}` })
    }
  }
  if (heartbeatMs * heartbeatsPerLease > leaseMs) {
    return new RunsConfigError({
      setting: names.heartbeatMs,
      message: `${names.heartbeatMs}=${heartbeatMs} must be at most a third of ${names.leaseMs}=${leaseMs}`
    })
  }
  if (!/^[A-Za-z0-9_.:-]{1,64}$/.test(claimantPrefix)) {
    return new RunsConfigError({ setting: "claimantPrefix", message: "must be 1-64 letters, digits or _ . : -" })
  }
  return { leaseMs, heartbeatMs, claimantPrefix, now: options.now }
}

const optionNames = { leaseMs: "leaseMs", heartbeatMs: "heartbeatMs" }

export const environmentNames = { leaseMs: "RUNLANE_RUN_LEASE_MS", heartbeatMs: "RUNLANE_RUN_HEARTBEAT_MS" } as const

/** RUNLANE_RUN_LEASE_MS and RUNLANE_RUN_HEARTBEAT_MS, each defaulting as above, checked together. */
export const runsConfigFromEnvironment = Effect.gen(function*() {
  const leaseMs = yield* Config.Int(environmentNames.leaseMs).pipe(Config.withDefault(defaults.leaseMs))
  const heartbeatMs = yield* Config.Int(environmentNames.heartbeatMs).pipe(Config.withDefault(defaults.heartbeatMs))
  const config = resolveRunsConfig({ leaseMs, heartbeatMs }, environmentNames)
  if (config instanceof RunsConfigError) return yield* config
  return config
})
