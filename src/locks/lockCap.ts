/**
 * How many pool connections conversation locks may pin at once, from DB_POOL_MAX and
 * RUNLANE_MAX_RESERVED_LOCKS. Pure, so every boundary is tested without a database.
 */

/** Connections left for everything that is not a conversation lock (queries, claims, health). */
export const poolHeadroom = 5

/** The share of the cap at which one warning is logged (re-armed when the count falls back below). */
export const nearCapShare = 0.8

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
