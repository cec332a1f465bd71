/**
 * Issue #12's dispatch figure with conversation locks on: 2,000 runs spread over 200 conversations,
 * worked by the real work loop (RunWorker with ConversationLocks, concurrency 16, a no-op handler),
 * against the locks-off figures' hand-written claim-one/complete loop with 16 workers over the same
 * runs. Beside the rate: lock cycles per run (ConversationLocks' `acquired` over a round, divided by
 * its runs) and the runs deferred because their conversation was busy or the lock cap refused it.
 *
 * The worker keeps a conversation's lock (one pinned connection) across the conversation's consecutive
 * runs, so with a cap of at least 200 each conversation is locked once per round (0.1 lock cycles per
 * run); with a smaller cap a new conversation takes the seat idle longest and runs cost up to one lock
 * cycle each. It is measured on a pool whose default cap (pool - 5) seats every conversation, and on
 * the default pool of 20 (cap 15). Stopping the worker (closing its scope) lets go of every seat, so each
 * round starts with no lock held.
 *
 * As in runClaims.ts, each side of each round starts from an emptied, freshly analyzed table holding
 * the same runs, and the side that goes first alternates.
 *
 * Measured figures are in the issue's closing notes: the first ones (0.36-0.45 of the baseline) were
 * dominated by a claim that sorted every pending run of the queue (fixed: it now reads runs_claim_idx
 * in order and stops at its limit).
 */
import { ConfigProvider, Deferred, Effect, Exit, Layer, Option, Redacted, Scope } from "effect"
import type postgres from "postgres"
import { Database } from "../src/db/Database.ts"
import { ConversationLocks, type LocalLockUsage } from "../src/locks/ConversationLocks.ts"
import { RunWorker } from "../src/runs/RunWorker.ts"
import { RunsQueue } from "../src/runs/RunsQueue.ts"
import { type BenchResult, median, now } from "./harness.ts"
import { handWrittenWorker } from "./runClaims.ts"

const queueName = "bench-conversations"
const conversations = 200
/** 10 runs per conversation, about as many runs as the 16-worker locks-off figure (2,000). */
const runs = 2_000
/** Handlers at once on the library side, workers on the hand-written side: the locks-off figure's 16. */
const workers = 16
const rounds = 5
/**
 * The locked side's pool: 200 seats under the default cap of 216 - 5 = 211, and 16 connections left
 * for claims, settles, heartbeats and the stats poll. The baseline keeps the locks-off figures' pool
 * of 16, one connection per worker.
 */
const poolMax = conversations + workers
/** A round that has not completed every run by then failed (a lost wake-up, runs stuck deferred). */
const roundDeadlineMs = 120_000
/** Once the handler has seen every run, how often the stats poll looks for the last settle's commit. */
const settlePollMs = 2

/**
 * RunWorker, ConversationLocks and RunsQueue with every RUNLANE_* setting at its default whatever the
 * caller's environment says (idle 30 s, cap from the pool, lease and heartbeat), on a pool of its own.
 */
const lockedLayer = (url: string, poolMax: number) =>
  RunWorker.layer.pipe(
    Layer.provideMerge(ConversationLocks.layer),
    Layer.provideMerge(RunsQueue.layer),
    Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax })),
    Layer.provide(ConfigProvider.layer(ConfigProvider.fromUnknown({})))
  )

interface LockedRound {
  readonly elapsed: number
  readonly acquired: number
  readonly busy: number
  readonly capReached: number
  readonly deferred: number
}

/**
 * Two pools: one that seats every conversation (when the server has the connections), and the default
 * pool of 20 (cap 15), where conversations take each other's seats.
 */
export const conversationDispatchBenchmarks = (
  url: string,
  raw: postgres.Sql
): Effect.Effect<ReadonlyArray<BenchResult>, unknown> =>
  Effect.gen(function*() {
    // 200 pinned connections on top of what the caller holds: a server with too few is told, not hung.
    const [room] = yield* Effect.promise(() =>
      raw<Array<{ free: number }>>`
        select current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
               - (select count(*)::int from pg_stat_activity where backend_type = 'client backend') as free`
    )
    const pools: Array<number> = []
    if (room!.free >= poolMax + 1) pools.push(poolMax)
    else yield* Effect.logWarning(`dispatch with every conversation seated skipped: it needs ${poolMax + 1} connections, the server has ${room!.free} free`)
    pools.push(defaultPoolMax)
    const results: Array<BenchResult> = []
    for (const pool of pools) results.push(yield* measure(url, raw, pool))
    return results
  })

/** The default pool (Database.layer's DB_POOL_MAX default), whose cap is 15. */
const defaultPoolMax = 20

const measure = (url: string, raw: postgres.Sql, pool: number): Effect.Effect<BenchResult, unknown> =>
  Effect.gen(function*() {
    const worker = yield* RunWorker
    const locks = yield* ConversationLocks
    const queue = yield* RunsQueue
    const { cap } = yield* locks.localUsage

    // Run g belongs to conversation g % 200: consecutive runs are of different conversations.
    const fill = Effect.promise(async () => {
      await raw`truncate runs, agent_transcript_snapshots`
      await raw`
        insert into runs (organization_id, agent_id, conversation_id, queue, action_input)
        select 'org-bench', 'agent-bench', 'conversation-' || (g % ${conversations}), ${queueName},
               jsonb_build_object('n', g)
          from generate_series(1, ${runs}) g`
      await raw`analyze runs`
    })

    const locked = Effect.gen(function*() {
      const before = yield* locks.localUsage
      let handled = 0
      const allHandled = yield* Deferred.make<void>()
      const handler = () => Effect.sync(() => void (++handled === runs && Deferred.doneUnsafe(allHandled, Effect.void)))
      const scope = yield* Scope.make()
      const start = now()
      yield* worker.start({ queue: queueName, handler, concurrency: workers }).pipe(Scope.provide(scope))
      // The handler's count costs nothing while the runs are worked; only the last settles are polled for.
      const settled = Effect.gen(function*() {
        yield* Deferred.await(allHandled)
        for (;;) {
          const stats = yield* queue.stats(queueName)
          if (stats.completed + stats.failed + stats.cancelled === runs) return stats
          yield* Effect.sleep(settlePollMs)
        }
      })
      const stats = yield* settled.pipe(Effect.timeoutOption(roundDeadlineMs))
      const elapsed = now() - start
      yield* Scope.close(scope, Exit.void)
      const after = yield* locks.localUsage
      const problem = Option.isNone(stats)
        ? `not every run completed within ${roundDeadlineMs} ms (${handled} handled)`
        : stats.value.completed !== runs
        ? `${stats.value.completed} of ${runs} runs completed`
        : after.held + after.inFlight + after.stranded > 0
        ? `locks still counted after the worker stopped: ${JSON.stringify(after)}`
        : after.acquired === before.acquired
        ? "no conversation lock was taken: the worker is not the one built with ConversationLocks"
        : undefined
      if (problem !== undefined) return yield* Effect.die(new Error(`dispatch with conversation locks: ${problem}`))
      // A deferred run was given a later run_at; the insert set run_at and created_at to the same now().
      const [{ deferred }] = yield* Effect.promise(() =>
        raw<[{ deferred: number }]>`select count(*)::int as deferred from runs where queue = ${queueName} and run_at > created_at`
      )
      const delta = (field: keyof Pick<LocalLockUsage, "acquired" | "busy" | "capReached">) => after[field] - before[field]
      return {
        elapsed,
        acquired: delta("acquired"),
        busy: delta("busy"),
        capReached: delta("capReached"),
        deferred
      } satisfies LockedRound
    })

    const handWritten = Effect.promise(async () => {
      const start = now()
      const refused = await Promise.all(Array.from({ length: workers }, (_, i) => handWrittenWorker(raw, `bench-${i}`, queueName)))
      return { elapsed: now() - start, refused: refused.reduce((a, b) => a + b, 0) }
    })

    const lockedRounds: Array<LockedRound> = []
    const handTimes: Array<number> = []
    let refused = 0
    for (let round = 0; round < rounds; round++) {
      for (let k = 0; k < 2; k++) {
        yield* fill
        if ((round + k) % 2 === 0) {
          const result = yield* locked
          // Round 0 warms both sides up (the 200 lock connections, prepared statements, JIT).
          if (round > 0) lockedRounds.push(result)
        } else {
          const result = yield* handWritten
          if (round > 0) {
            handTimes.push(result.elapsed)
            refused += result.refused
          }
        }
      }
    }
    yield* Effect.promise(() => raw`truncate runs, agent_transcript_snapshots`)

    const lib = median(lockedRounds.map((r) => r.elapsed))
    const hand = median(handTimes)
    const sum = (field: keyof LockedRound) => lockedRounds.reduce((total, r) => total + r[field], 0)
    const measured = lockedRounds.length * runs
    return {
      name: `dispatch, ${workers} workers, ${conversations} conversations, locks on, cap ${cap}`,
      value: (runs / lib) * 1000,
      baseline: (runs / hand) * 1000,
      unit: "runs/s",
      ratio: hand / lib,
      note: `RunWorker, cap ${cap} of pool ${pool}: ${(sum("acquired") / measured).toFixed(3)} lock cycles/run, ` +
        `${sum("deferred")} deferred (busy ${sum("busy")}, cap ${sum("capReached")}) in ${measured} runs; ` +
        `baseline: the claim-one/complete loop, no per-conversation exclusion (${refused} claims refused by the index)`
    } satisfies BenchResult
    // Built afresh (local): the runs group's own RunWorker and RunsQueue come from the same static
    // layers, and a shared memo map would hand this figure that lock-less worker over the other pool.
  }).pipe(Effect.scoped, Effect.provide(lockedLayer(url, pool), { local: true }))

