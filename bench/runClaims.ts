/**
 * Issue #12's dispatch figures: runs processed per second (claim, a no-op handler, complete) by W
 * concurrent workers, against a hand-written postgres.js loop that claims one run with SKIP LOCKED and
 * completes it, W loops at once, for W = 1, 4 and 16.
 *
 * - The work loop (the figures of record): W RunWorkers, each with the default 10 slots and a no-op
 *   handler, as W worker processes would run them (here in one process, on one pool), and one RunWorker
 *   with 16 slots against 16 loops, the same number of runs in flight on both sides. A round ends when
 *   the handler has seen every run and the workers have stopped, which settles the last ones.
 * - RunsQueue's statements alone, as the work loop issues them (in batches of up to 16 one statement
 *   completes a batch and claims the next; larger ones claim and complete apart), without the loop:
 *   the ceiling the loop's own bookkeeping (fibers, slots, metrics) takes its share of.
 *
 * Each side of each round starts from an emptied, freshly analyzed table holding the same runs, and the
 * side that goes first alternates, so neither side inherits the other's dead rows or index bloat.
 */
import { Deferred, Effect, Exit, Layer, Redacted, Scope } from "effect"
import postgres from "postgres"
import { Database } from "../src/db/Database.ts"
import { RunWorker } from "../src/runs/RunWorker.ts"
import { type ClaimedRun, RunsQueue } from "../src/runs/RunsQueue.ts"
import { largestLiteralLimit } from "../src/runs/sql/claimEligibility.ts"
import { type BenchResult, median, now } from "./harness.ts"

const queueName = "bench-dispatch"
/**
 * Runs per side per round, by worker count: the hand-written side takes 1-4 s a round at 2,000-4,000
 * runs/s on this 2-core machine, long enough to hold its share of scheduling noise. Rounds of 2,000 at
 * 16 workers (the library side done in ~0.2 s) put the statements' ratio at 2.5-3.3 where rounds of
 * 8,000 gave 3.1-3.5 (scratch runs, same machine): such rounds ran mostly before V8 had optimized the
 * loop (the work loop's Node CPU per run fell from 110-135 to 45-60 us over a process's first 40,000
 * runs), and their last batches ran with most workers idle.
 */
const runsPerRound = { 1: 4_000, 4: 8_000, 16: 16_000 } as const
/**
 * Runs each library worker claims per statement, which also completes the batch before: 10 (one commit
 * per 10 runs instead of 2 per run) for every worker count, and 50 (0.02 per run) for 4 and 16, the size of batch
 * a prefetching worker such as graphile-worker's local queue works with.
 */
const statementConfigurations = [
  { workers: 1, claimBatch: 10 },
  { workers: 4, claimBatch: 10 },
  { workers: 16, claimBatch: 10 },
  { workers: 4, claimBatch: 50 },
  { workers: 16, claimBatch: 50 }
] as const
/**
 * The work loop: `loops` RunWorkers of `slots` each against `workers` hand-written loops. The first
 * three are the W workers, each a worker process's loop with the default 10 slots; the last
 * holds as many runs in flight as its baseline.
 */
const workLoopConfigurations = [
  { loops: 1, slots: 10, workers: 1 },
  { loops: 4, slots: 10, workers: 4 },
  { loops: 16, slots: 10, workers: 16 },
  { loops: 1, slots: 16, workers: 16 }
] as const
const rounds = 7
/** A work-loop round that has not seen every run by then failed (a lost wake-up): the bench stops. */
const roundDeadlineMs = 120_000

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

/**
 * Rounds of both sides, each on a freshly filled table, the side that goes first alternating; `check`
 * runs after each library side, outside its time. Round 0 warms both sides up (connections, prepared
 * statements, JIT). The ratio is the median of the rounds' ratios: the two sides of a round run seconds
 * apart, so load that drifts between rounds (this VM's own swings reach 2x) cancels out of each ratio.
 */
const sideBySide = (
  sides: readonly [Effect.Effect<number, unknown>, Effect.Effect<number, unknown>],
  fill: Effect.Effect<void>,
  check: Effect.Effect<void>
) =>
  Effect.gen(function*() {
    const times: [Array<number>, Array<number>] = [[], []]
    const ratios: Array<number> = []
    for (let round = 0; round < rounds; round++) {
      const elapsed: [number, number] = [0, 0]
      for (let k = 0; k < sides.length; k++) {
        const side = (round + k) % sides.length
        yield* fill
        elapsed[side] = yield* sides[side]!
        if (side === 0) yield* check
      }
      if (round > 0) {
        times[0].push(elapsed[0])
        times[1].push(elapsed[1])
        ratios.push(elapsed[1] / elapsed[0])
      }
    }
    return { lib: median(times[0]), hand: median(times[1]), ratio: median(ratios) }
  })

/**
 * Runs `measure` on a pool of `max` connections of its own, with RunsQueue and RunWorker built over it;
 * both sides of a figure share it. The pool is sized to the figure's workers because postgres.js hands
 * a loop's consecutive queries to different idle connections: on a pool of 20, one hand-written loop
 * measured 1,300-1,750 runs/s and 325-405 us of server CPU per run, against 3,700 and 160 us on a pool
 * of 1, so on one shared pool a figure depended on how many connections the figures before it had
 * opened (the 1- and 4-loop baselines measured 2-4x slower after the 16-worker figures).
 */
const onPool = <A>(url: string, max: number, measure: (raw: postgres.Sql) => Effect.Effect<A, unknown, RunsQueue | RunWorker>) =>
  Effect.gen(function*() {
    const raw = yield* Effect.acquireRelease(
      Effect.sync(() => postgres(url, { max, onnotice: () => {} })),
      (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
    )
    const layer = RunWorker.layer.pipe(
      Layer.provideMerge(RunsQueue.layer),
      Layer.provideMerge(Database.layerFromClient(raw, { url: Redacted.make(url), poolMax: max }))
    )
    // Local: a memo map shared with the rest of the bench would hand back another pool's services.
    return yield* measure(raw).pipe(Effect.provide(layer, { local: true }))
  }).pipe(Effect.scoped)

export const claimBenchmarks = (url: string): Effect.Effect<ReadonlyArray<BenchResult>, unknown> =>
  Effect.gen(function*() {
    const results: Array<BenchResult> = []
    for (const { loops, slots, workers } of workLoopConfigurations) {
      results.push(yield* onPool(url, Math.max(loops, workers), (raw) => workLoopFigure(raw, loops, slots, workers)))
    }
    for (const { workers, claimBatch } of statementConfigurations) {
      results.push(yield* onPool(url, workers, (raw) => statementsFigure(raw, workers, claimBatch)))
    }
    return results
  })

const fill = (raw: postgres.Sql, runs: number) =>
  Effect.promise(async () => {
    await raw`truncate runs, agent_transcript_snapshots`
    await raw`
      insert into runs (organization_id, queue, action_input)
      select 'org-bench', ${queueName}, jsonb_build_object('n', g) from generate_series(1, ${runs}) g`
    await raw`analyze runs`
  })

const handWritten = (raw: postgres.Sql, workers: number) =>
  Effect.promise(async () => {
    const start = now()
    await Promise.all(Array.from({ length: workers }, (_, i) => handWrittenWorker(raw, `bench-${i}`)))
    return now() - start
  })

/** The work loop: `loops` RunWorkers of `slots` against `workers` hand-written loops. */
const workLoopFigure = (raw: postgres.Sql, loops: number, slots: number, workers: 1 | 4 | 16) =>
  Effect.gen(function*() {
    const runWorker = yield* RunWorker
    const runs = runsPerRound[workers]
    // Stopped once the handler has seen every run (stopping settles what is still to complete); answers
    // the milliseconds it took.
    const workLoops = Effect.gen(function*() {
      const start = now()
      const scope = yield* Scope.make()
      const allSeen = yield* Deferred.make<void>()
      let seen = 0
      const handler = () => Effect.sync(() => void (++seen === runs && Deferred.doneUnsafe(allSeen, Effect.void)))
      for (let i = 0; i < loops; i++) {
        yield* runWorker.start({ queue: queueName, concurrency: slots, handler }).pipe(Scope.provide(scope))
      }
      const finished = yield* Deferred.await(allSeen).pipe(Effect.timeoutOption(roundDeadlineMs))
      yield* Scope.close(scope, Exit.void)
      if (finished._tag === "None") return yield* Effect.die(new Error(`the work loop saw ${seen} of ${runs} runs in ${roundDeadlineMs} ms`))
      return now() - start
    })
    const everyRunCompleted = Effect.promise(() =>
      raw<[{ n: number }]>`select count(*)::int as n from runs where queue = ${queueName} and status = 'completed'`
    ).pipe(Effect.flatMap(([{ n }]) => n === runs ? Effect.void : Effect.die(new Error(`${n} of ${runs} runs completed`))))
    const { lib, hand, ratio } = yield* sideBySide([workLoops, handWritten(raw, workers)], fill(raw, runs), everyRunCompleted)
    yield* Effect.promise(() => raw`truncate runs, agent_transcript_snapshots`)
    return {
      name: loops === 1 && slots === workers
        ? `work loop, 1 loop of ${slots} slots vs ${workers} loops`
        : `work loop, ${loops} worker${loops === 1 ? "" : "s"} of ${slots} slots`,
      value: (runs / lib) * 1000,
      baseline: (runs / hand) * 1000,
      unit: "runs/s",
      ratio,
      note: `RunWorker, no-op handler, vs ${workers} claim-one/complete loop${workers === 1 ? "" : "s"}; target ${
        workers === 16 ? ">= 3.5" : workers === 4 ? ">= 2.5" : "-"
      }`
    } satisfies BenchResult
  })

/** RunsQueue's statements alone, driven by bare loops as the work loop would issue them. */
const statementsFigure = (raw: postgres.Sql, workers: 1 | 4 | 16, claimBatch: number) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    // As RunWorker does it: in batches of up to 16 each statement completes the runs the last one
    // claimed and claims the next batch (completeManyAndClaim; the last one completes and finds nothing
    // more); larger batches are claimed and completed in statements of their own.
    const libraryWorker = Effect.gen(function*() {
      let finished: ReadonlyArray<ClaimedRun> = []
      for (;;) {
        const claimed = claimBatch <= largestLiteralLimit
          ? (yield* queue.completeManyAndClaim(finished, queueName, { limit: claimBatch })).claimed
          : yield* Effect.andThen(queue.completeMany(finished), queue.claim(queueName, { limit: claimBatch }))
        if (claimed.length === 0) return
        finished = claimed
      }
    })
    const runs = runsPerRound[workers]
    const libraryWorkers = Effect.gen(function*() {
      const start = now()
      yield* Effect.all(Array.from({ length: workers }, () => libraryWorker), { concurrency: "unbounded" })
      return now() - start
    })
    const { lib, hand, ratio } = yield* sideBySide([libraryWorkers, handWritten(raw, workers)], fill(raw, runs), Effect.void)
    // Leave the table as the figures after this one expect it: without runs lacking a conversation.
    yield* Effect.promise(() => raw`truncate runs, agent_transcript_snapshots`)
    return {
      name: `statements, ${workers} worker${workers === 1 ? "" : "s"}, claim ${claimBatch}`,
      value: (runs / lib) * 1000,
      baseline: (runs / hand) * 1000,
      unit: "runs/s",
      ratio,
      note: `statements alone: ${claimBatch <= largestLiteralLimit ? "completeManyAndClaim" : "claim + completeMany"} of ${claimBatch} per worker vs claim-one/complete loop`
    } satisfies BenchResult
  })
