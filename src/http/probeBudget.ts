/**
 * The database budget of the unauthenticated routes (/health/ready, /health/orchestrator, /metrics).
 *
 * Anyone can call them, so together they may run at most `maxProbeQueries` queries at once; a call
 * beyond that does not wait for a connection, it answers from what it has (a cached value, nulls, or
 * 503). Before this bound, 20 concurrent stale scrapes of /metrics each opened a 2 s count and held
 * every connection of a 20-connection pool, and conversation locks failed `PoolExhausted`.
 *
 * postgres.js cannot cancel a query, so a caller that stops waiting does not end it: the permit is
 * held by a detached fiber until the query itself ends, and an abandoned query still counts.
 */
import { Effect, Fiber, Option, Semaphore } from "effect"

/**
 * Queries the unauthenticated routes may run at once. 2 leaves 18 of the default 20 connections to
 * uploads and locks, and is enough for a load balancer's probe and a scraper at the same time.
 */
export const maxProbeQueries = 2

export interface ProbeBudget {
  /**
   * Runs `query` when a permit is free and waits at most `waitMs` for it. None when no permit was
   * free or the answer did not come in time (the query then runs on, holding its permit). `onEnd`
   * runs once the query has ended, or at once when it never started.
   */
  readonly run: <A, E>(
    query: Effect.Effect<A, E>,
    waitMs: number,
    onEnd?: Effect.Effect<void>
  ) => Effect.Effect<Option.Option<A>, E>
}

export const makeProbeBudget: Effect.Effect<ProbeBudget> = Effect.map(
  Semaphore.make(maxProbeQueries),
  (permits): ProbeBudget => ({
    run: (query, waitMs, onEnd = Effect.void) =>
      Effect.flatMap(
        Effect.forkDetach(Effect.uninterruptible(permits.withPermitsIfAvailable(1)(query).pipe(Effect.ensuring(onEnd)))),
        (fiber) => Fiber.join(fiber).pipe(Effect.timeoutOption(waitMs), Effect.map(Option.flatten))
      )
  })
)
