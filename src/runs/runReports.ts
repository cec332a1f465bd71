/**
 * What RunsQueue answers besides runs: counts, a queue's stats, what a cancel did, what a sweep did.
 */

export interface RunCount {
  readonly queue: string
  readonly status: string
  readonly count: number
}

export interface QueueStats {
  readonly pending: number
  readonly claimed: number
  readonly completed: number
  readonly failed: number
  readonly cancelled: number
  /** How long the oldest due, unexpired pending run has waited since its run_at; null when none waits. */
  readonly oldestPendingAgeMs: number | null
}

/** What `cancel` did: a pending run is cancelled now, a claimed one when its worker next reports. */
export type CancelOutcome =
  | { readonly _tag: "Cancelled" }
  | { readonly _tag: "CancelRequested" }
  | { readonly _tag: "AlreadyFinal"; readonly status: string }

export interface SweepResult {
  /** Runs back to pending, their lost attempt counted. */
  readonly returned: number
  /** Runs that lost their last attempt and ended `failed`. */
  readonly failed: number
  /** Runs whose cancellation was pending, now `cancelled`. */
  readonly cancelled: number
}

/** One run's dispatch state, as `RunsQueue.get` reads it. */
export interface RunState {
  readonly id: number
  readonly queue: string
  readonly status: string
  /** Attempts spent (failed or lost). */
  readonly attempts: number
  readonly maxAttempts: number
  /** Not claimable before this. */
  readonly runAt: Date
  /** The last failure's text. */
  readonly error: string | null
  /** The claimant (worker process) holding it, while claimed. */
  readonly claimedBy: string | null
  readonly leaseExpiresAt: Date | null
  readonly cancelRequestedAt: Date | null
  readonly createdAt: Date
  readonly completedAt: Date | null
}
