/**
 * Issue #12's dispatch figure: runs processed per second (claim, a no-op handler, complete) by W
 * concurrent workers, RunsQueue's statements as the work loop uses them (in batches of up to 16 one
 * statement completes a batch and claims the next; larger ones claim and complete apart) against a hand-written postgres.js loop that claims one run
 * with SKIP LOCKED and completes it, for W = 1, 4 and 16.
 *
 * Each side of each round starts from an emptied, freshly analyzed table holding the same runs, and the
 * side that goes first alternates, so neither side inherits the other's dead rows or index bloat.
 */
import { Effect } from "effect"
import postgres from "postgres"
import { type ClaimedRun, RunsQueue } from "../src/runs/RunsQueue.ts"
import { largestLiteralLimit } from "../src/runs/sql/claimEligibility.ts"
import { type BenchResult, median, now } from "./harness.ts"

const queueName = "bench-dispatch"
/**
 * Runs per side per round, by worker count: the hand-written side takes ~2-4 s a round at ~200-500
 * runs/s on this 2-core machine, long enough to hold its share of scheduling noise.
 */
const runsPerRound = { 1: 500, 4: 1_000, 16: 2_000 } as const
/**
 * Runs each library worker claims per statement, which also completes the batch before: 10 (one commit
 * per 10 runs instead of 2 per run) for every worker count, and 50 (0.02 per run) for 4 and 16, the size of batch
 * a prefetching worker such as graphile-worker's local queue works with. Batches of 50 get twice the runs
 * per round, so a round still holds several batches per worker.
 */
const configurations = [
  { workers: 1, claimBatch: 10 },
  { workers: 4, claimBatch: 10 },
  { workers: 16, claimBatch: 10 },
  { workers: 4, claimBatch: 50 },
  { workers: 16, claimBatch: 50 }
] as const
const rounds = 7

/**
 * The baseline: one run per claim, as the reference system and most hand-rolled queues do it. Answers
 * how many claims the conversation index refused: it claims runs of a conversation with no regard to
 * its other runs, so two of them claimed at once would be a second claimed run of one conversation,
 * which runs_conversation_claimed_uniq refuses (23505); the loop then simply claims again. Runs without
 * a conversation (the figures of this file) never meet it.
 */
export const handWrittenWorker = async (raw: postgres.Sql, me: string, queue: string = queueName): Promise<number> => {
  let refused = 0
  for (;;) {
    const claimed = await raw<Array<{ id: string }>>`
      with next_run as (
        select id from runs
         where status = 'pending' and queue = ${queue}
           and run_at <= now() and (expires_at is null or expires_at > now())
         order by priority desc nulls last, run_at, id
         limit 1
           for update skip locked
      )
      update runs r set status = 'claimed', claimed_at = now(), claimed_by = ${me}
        from next_run where r.id = next_run.id
      returning r.id, r.action_input`.catch((cause: { code?: unknown; constraint_name?: unknown }) => {
        if (cause.code === "23505" && cause.constraint_name === "runs_conversation_claimed_uniq") return undefined
        throw cause
      })
    if (claimed === undefined) {
      refused++
      continue
    }
    const [run] = claimed
    if (run === undefined) return refused
    await raw`
      update runs set status = 'completed', completed_at = now(), claimed_by = null, claimed_at = null
       where id = ${run.id} and status = 'claimed' and claimed_by = ${me}`
  }
}

export const claimBenchmarks = (raw: postgres.Sql): Effect.Effect<ReadonlyArray<BenchResult>, unknown, RunsQueue> =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    const fill = (runs: number) => Effect.promise(async () => {
      await raw`truncate runs, agent_transcript_snapshots`
      await raw`
        insert into runs (organization_id, queue, action_input)
        select 'org-bench', ${queueName}, jsonb_build_object('n', g) from generate_series(1, ${runs}) g`
      await raw`analyze runs`
    })
    // As RunWorker does it: in batches of up to 16 each statement completes the runs the last one
    // claimed and claims the next batch (completeManyAndClaim; the last one completes and finds nothing
    // more); larger batches are claimed and completed in statements of their own.
    const libraryWorker = (claimBatch: number) => Effect.gen(function*() {
      let finished: ReadonlyArray<ClaimedRun> = []
      for (;;) {
        const claimed = claimBatch <= largestLiteralLimit
          ? (yield* queue.completeManyAndClaim(finished, queueName, { limit: claimBatch })).claimed
          : yield* Effect.andThen(queue.completeMany(finished), queue.claim(queueName, { limit: claimBatch }))
        if (claimed.length === 0) return
        finished = claimed
      }
    })
    const results: Array<BenchResult> = []
    for (const { workers, claimBatch } of configurations) {
      const runs = runsPerRound[workers] * (claimBatch / 10 > 1 ? 2 : 1)
      const sides = [
        Effect.gen(function*() {
          const start = now()
          yield* Effect.all(Array.from({ length: workers }, () => libraryWorker(claimBatch)), { concurrency: "unbounded" })
          return now() - start
        }),
        Effect.promise(async () => {
          const start = now()
          await Promise.all(Array.from({ length: workers }, (_, i) => handWrittenWorker(raw, `bench-${i}`)))
          return now() - start
        })
      ] as const
      const times: [Array<number>, Array<number>] = [[], []]
      const ratios: Array<number> = []
      for (let round = 0; round < rounds; round++) {
        const elapsed: [number, number] = [0, 0]
        for (let k = 0; k < sides.length; k++) {
          const side = (round + k) % sides.length
          yield* fill(runs)
          elapsed[side] = yield* sides[side]!
        }
        // Round 0 warms both sides up (connections, prepared statements, JIT). The ratio is the median of
        // the rounds' ratios: the two sides of a round run seconds apart, so load that drifts between
        // rounds (this VM's own swings reach 2x) cancels out of each ratio.
        if (round > 0) {
          times[0].push(elapsed[0])
          times[1].push(elapsed[1])
          ratios.push(elapsed[1] / elapsed[0])
        }
      }
      const [lib, hand] = times.map(median) as [number, number]
      results.push({
        name: `dispatch, ${workers} worker${workers === 1 ? "" : "s"}, claim ${claimBatch}`,
        value: (runs / lib) * 1000,
        baseline: (runs / hand) * 1000,
        unit: "runs/s",
        ratio: median(ratios),
        note: `${claimBatch <= largestLiteralLimit ? "completeManyAndClaim" : "claim + completeMany"} of ${claimBatch} per worker vs claim-one/complete loop; target ${workers === 16 ? ">= 3.5" : workers === 4 ? ">= 2.5" : "-"}`
      })
    }
    // Leave the table as the figures after this one expect it: without runs lacking a conversation.
    yield* Effect.promise(() => raw`truncate runs, agent_transcript_snapshots`)
    return results
  })
