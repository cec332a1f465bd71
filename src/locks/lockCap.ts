/**
 * How many pool connections conversation locks may pin at once, from DB_POOL_MAX and
 * RUNLANE_MAX_RESERVED_LOCKS. Pure, so every boundary is tested without a database.
 */

/** Connections left for everything that is not a conversation lock (queries, claims, health). */
export const poolHeadroom = 5

/** The share of the cap at which the near-cap warning fires. */
export const nearCapShare = 0.8

/** The share of the cap the count must fall to before the warning can fire again (hysteresis). */
export const nearCapRearmShare = 0.5

/** Shortest time between two near-cap warnings, however often the count crosses: one per minute. */
export const nearCapWarningIntervalMs = 60_000

export const capVariable = "RUNLANE_MAX_RESERVED_LOCKS"

export type CapResolution =
  | { readonly _tag: "Cap"; readonly cap: number }
  | { readonly _tag: "Invalid"; readonly message: string }

/**
 * Default `max(1, poolMax - 5)`. An override must be a whole number from 0 to poolMax - 1: 0 drains
 * (every acquire fails LockCapReached), and a cap at or above the pool size could pin every
 * connection, after which `reserve()` waits forever. A pool of one connection has no safe default.
 */
export const resolveLockCap = (poolMax: number, override: string | undefined): CapResolution => {
  if (override === undefined || override.trim() === "") {
    const cap = Math.max(1, poolMax - poolHeadroom)
    return cap < poolMax
      ? { _tag: "Cap", cap }
      : {
        _tag: "Invalid",
        message: `DB_POOL_MAX=${poolMax} leaves no connection for queries once a conversation lock is held; ` +
          `use a pool of at least 2, or set ${capVariable}=0 to disable conversation locks`
      }
  }
  const text = override.trim()
  if (/^-\d+$/.test(text)) {
    return { _tag: "Invalid", message: `${capVariable}=${text} is negative; use 0 to drain, or a positive whole number` }
  }
  if (!/^\d+$/.test(text)) {
    return { _tag: "Invalid", message: `${capVariable}=${JSON.stringify(override)} is not a whole number` }
  }
  const cap = Number(text)
  if (cap >= poolMax) {
    return {
      _tag: "Invalid",
      message: `${capVariable}=${text} is not below DB_POOL_MAX=${poolMax}; pinned connections could take the whole pool`
    }
  }
  return { _tag: "Cap", cap }
}

/** The count at which the near-cap warning fires; none for a cap of 0. */
export const nearCapThreshold = (cap: number): number => (cap > 0 ? Math.ceil(cap * nearCapShare) : Number.POSITIVE_INFINITY)

/** The count at or below which a fired warning re-arms: half the cap, rounded down (cap 1: 0, cap 6: 3). */
export const nearCapRearmAt = (cap: number): number => Math.floor(cap * nearCapRearmShare)

/**
 * The near-cap warning: fires when the count rises to the threshold, then stays silent until the
 * count has fallen to the re-arm level and at least `intervalMs` has passed. At cap 1 the threshold is
 * 1 and the re-arm level 0, so without the interval every lock cycle would warn. Pure: time is passed in.
 */
export class NearCapAlarm {
  private armed = true
  private lastFiredAt = Number.NEGATIVE_INFINITY
  readonly threshold: number
  readonly rearmAt: number

  constructor(cap: number, private readonly intervalMs: number = nearCapWarningIntervalMs) {
    this.threshold = nearCapThreshold(cap)
    this.rearmAt = nearCapRearmAt(cap)
  }

  /** Called after every change of the count; true when a warning is due now (only ever on a rise). */
  observe(count: number, rose: boolean, nowMs: number): boolean {
    if (!this.armed) {
      if (count <= this.rearmAt) this.armed = true
      return false
    }
    if (!rose || count < this.threshold || nowMs - this.lastFiredAt < this.intervalMs) return false
    this.armed = false
    this.lastFiredAt = nowMs
    return true
  }
}
