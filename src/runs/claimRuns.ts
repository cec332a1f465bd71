/**
 * claimRuns: claims with runClaimAvailable, or with runCompleteAndClaim when there are runs to
 * complete; runs the statement again when the conversation index refused a claim (the whole statement
 * rolled back, its completions too); and shapes the answer: the completions as a SettleOutcome, the
 * claimed rows as ClaimedRun in claim order.
 */
import { type SettleOutcome, settleOutcome } from "./settleOutcome.ts"
import type { ClaimedRunRow } from "./sql/claimEligibility.ts"
import { runClaimAvailable } from "./sql/runClaimAvailable.ts"
import { type CompleteAndClaimParameters, runCompleteAndClaim } from "./sql/runCompleteAndClaim.ts"
import type { RunsClient } from "./sql/runsClient.ts"
import type { JsonObject } from "../schema/runs.ts"

export interface ClaimedRun {
  readonly id: number
  readonly queue: string
  readonly organizationId: string
  readonly agentId: string | null
  readonly conversationId: string | null
  readonly payload: JsonObject
  readonly priority: number
  /** Attempts already spent (failed or lost) before this one. */
  readonly attempts: number
  readonly maxAttempts: number
  readonly runAt: Date
  readonly claimedAt: Date
  readonly leaseExpiresAt: Date
  /** When the run was enqueued. */
  readonly createdAt: Date
  /**
   * This claim, as settles and heartbeats check it beside the run id: a UUID made for the claim
   * statement, shared by the runs it claimed (so runs whose answer was lost can be found again).
   */
  readonly claimToken: string
}

/**
 * Statements per claim at most. A conflict means another claimer committed a claim of the same
 * conversation while this statement ran (see runCompleteAndClaim.ts); the next statement's snapshot sees
 * it. Two conflicts in a row need two such commits within two statements: three rounds, then the error.
 */
const maxClaimRounds = 3

const conversationIndex = "runs_conversation_claimed_uniq"

/** unique_violation on the conversation index, or a deadlock between two claimers waiting on it. */
const isClaimConflict = (cause: unknown): boolean => {
  const error = cause as { code?: unknown; constraint_name?: unknown }
  return (error.code === "23505" && error.constraint_name === conversationIndex) || error.code === "40P01"
}

const toClaimedRun = (row: ClaimedRunRow): ClaimedRun => ({
  id: Number(row.id),
  queue: row.queue,
  organizationId: row.organization_id,
  agentId: row.agent_id,
  conversationId: row.conversation_id,
  payload: row.action_input as JsonObject,
  priority: row.priority,
  attempts: row.attempts,
  maxAttempts: row.max_attempts,
  runAt: new Date(row.run_at),
  claimedAt: new Date(row.claimed_at),
  leaseExpiresAt: new Date(row.lease_expires_at),
  createdAt: new Date(row.created_at),
  claimToken: row.claim_id
})

/** UPDATE ... RETURNING answers in no particular order; callers get the claim order. */
const claimOrder = (a: ClaimedRun, b: ClaimedRun): number =>
  b.priority - a.priority || a.runAt.getTime() - b.runAt.getTime() || a.id - b.id

export interface CompletedAndClaimed {
  /** The runs given to complete: completed, cancelled (a cancellation was pending), or lost. */
  readonly completed: SettleOutcome
  readonly claimed: ReadonlyArray<ClaimedRun>
}

export const claimRuns = async (client: RunsClient, p: CompleteAndClaimParameters): Promise<CompletedAndClaimed> => {
  for (let round = 1; ; round++) {
    try {
      const [completed, claimed] = p.ids.length === 0
        ? [[], p.limit === 0 ? [] : await runClaimAvailable(client, p)]
        : await runCompleteAndClaim(client, p).then(([row]) => [row.completed, row.claimed] as const)
      return {
        completed: settleOutcome(p.ids, completed),
        claimed: claimed.map(toClaimedRun).sort(claimOrder)
      }
    } catch (cause) {
      if (round >= maxClaimRounds || !isClaimConflict(cause)) throw cause
    }
  }
}
