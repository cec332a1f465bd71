/**
 * What both claim statements (runClaimAvailable, runCompleteAndClaim) share: which runs a claim may
 * take, in which order, with how large a LIMIT, and the columns it answers. Text without parameters,
 * embedded with `client.unsafe`, so the two statements cannot drift apart.
 *
 * A run is a candidate when it is pending, due (run_at <= now) and not expired; a run with a
 * conversation only when it is that conversation's oldest live pending run (by id) in the queue and no
 * run of the conversation is claimed in the queue, so a conversation's runs of one queue run in order
 * and one at a time. Per queue, not across queues: a queue without workers must not stall the
 * conversation's runs in every other queue, and a handler that waits for a run of its conversation in
 * another queue must not deadlock. Across queues the conversation lock is the guarantee.
 *
 * Why those checks cannot be the guarantee alone: they read the statement's snapshot, taken before the
 * row locks. Two claimers can still see two different runs of one conversation as eligible when a run
 * with a smaller id commits late (concurrent producers) or when their clocks disagree on whether the
 * oldest run has expired. The unique index runs_conversation_claimed_uniq makes a second claimed run of
 * a conversation impossible: the later claimer waits for the earlier one's commit and fails with
 * unique_violation (23505), and `claimRuns` runs the statement again, when the checks see the claim.
 * Expired runs are not "older": an expired run is never claimed and must not block its conversation.
 *
 * Why a limit of up to 16 is written into the statement's text: planning a claim costs as much server
 * CPU as running it (0.5 ms of a 1 ms claim of 10 runs on PostgreSQL 15 here). A prepared statement is
 * planned anew on each execution unless its one generic plan costs no more than the plans made for its
 * parameters, and a generic plan takes a LIMIT parameter for 10% of the table, so with a parameter
 * PostgreSQL never keeps a plan for a queue with a backlog. A literal limit lets it keep one per text.
 * Each text costs its backend ~200 KB (plan and parse trees; 69 claim statements took 14 MB on
 * PostgreSQL 15), so the literal stops at 16: at most 35 claim texts per connection (runClaimAvailable
 * 1-16, runCompleteAndClaim 0-16, each also bound; ~7 MB), and the work loop's default of 10 slots
 * stays within it. A larger claim binds its
 * limit and amortizes its planning over more runs. test/runs/claimPlan.test.ts asserts the order and
 * the reuse.
 *
 * What a kept plan costs: it was made for the table as it was. One made while the table was small and
 * kept through a burst of runs keeps runs_claim_idx's order (the clock below is why), but may check a
 * conversation's older runs by reading the table, as was cheapest then: 76 ms per claim at 20,000
 * pending runs in 2,000 conversations against 3 ms for a new plan, until the next ANALYZE of `runs`
 * (autovacuum's, which such a burst triggers) makes PostgreSQL plan again. With the limit bound, the
 * same kept plan measured 90-180 ms; planning every claim instead costs 0.5 ms on each.
 */
import type { RunsClient } from "./runsClient.ts"

/**
 * The conditions on `r` (a pending run of the queue) beyond status and queue. The clock is read as a
 * scalar subquery of the statement's `clock` CTE, not joined: joined, it let a plan cached while the
 * table was small put `run_at <= now` into the index condition with the clock as the outer side, losing
 * runs_claim_idx's order, and then sort every pending run of the queue on each claim (10-14 s per claim
 * once 20,000 runs arrived; test/runs/claimPlan.test.ts).
 */
export const claimableRun = `
  r.run_at <= (select now from clock)
  and (r.expires_at is null or r.expires_at > (select now from clock))
  and (
    r.conversation_id is null
    or (
      not exists (
        select 1 from runs c
         where c.status = 'claimed' and c.conversation_id is not null
           and c.queue = r.queue and c.organization_id = r.organization_id
           and coalesce(c.agent_id, '') = coalesce(r.agent_id, '')
           and c.conversation_id = r.conversation_id)
      and not exists (
        select 1 from runs o
         where o.status = 'pending' and o.conversation_id is not null
           and o.queue = r.queue and o.organization_id = r.organization_id
           and coalesce(o.agent_id, '') = coalesce(r.agent_id, '')
           and o.conversation_id = r.conversation_id
           and o.id < r.id
           and (o.expires_at is null or o.expires_at > (select now from clock)))
    )
  )`

/**
 * NULLS LAST as runs_claim_idx is built (priority is NOT NULL, so the order is the same): a bare DESC
 * means NULLS FIRST, which the index cannot give, and PostgreSQL then reads and sorts every pending run
 * of the queue on every claim (7.5 ms at 2,000 pending, 0.4 ms with the index).
 */
export const claimOrder = `order by r.priority desc nulls last, r.run_at, r.id`

/** Largest limit written into the statement's text (see above). */
export const largestLiteralLimit = 16

/** The LIMIT of a claim: literal up to 16, bound above. */
export const claimLimit = (client: RunsClient, limit: number) =>
  Number.isSafeInteger(limit) && limit >= 0 && limit <= largestLiteralLimit ? client.unsafe(String(limit)) : limit

/** The columns a claim answers, as ClaimedRunRow names them. */
export const claimedRunColumns = `
  r.id::text as id, r.queue, r.organization_id, r.agent_id, r.conversation_id, r.action_input,
  r.priority, r.attempts, r.max_attempts, r.run_at::text as run_at, r.claimed_at::text as claimed_at,
  r.lease_expires_at::text as lease_expires_at, r.created_at::text as created_at, r.claim_id::text as claim_id`

export interface ClaimedRunRow {
  readonly id: string
  readonly queue: string
  readonly organization_id: string
  readonly agent_id: string | null
  readonly conversation_id: string | null
  readonly action_input: unknown
  readonly priority: number
  readonly attempts: number
  readonly max_attempts: number
  readonly run_at: string
  readonly claimed_at: string
  readonly lease_expires_at: string
  readonly created_at: string
  readonly claim_id: string
}
