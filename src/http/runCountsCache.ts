/**
 * Run counts for /metrics. Counting reads the whole runs table, so: one count in flight at a time
 * (single flight: a scrape that finds one running does not start another), at most one attempt per
 * `runCountsMaxAgeMs` whether it succeeded or not, under the probe budget, and the last good counts
 * served meanwhile, with their age. On a table too large to count within `countsTimeoutMs`, that is
 * one connection for 2 s every 15 s, however many scrapers call.
 */
import { Effect } from "effect"
import type { DatabaseError } from "../db/DatabaseError.ts"
import { countsTimeoutMs, type RunCount } from "../runs/RunsQueue.ts"
import type { ProbeBudget } from "./probeBudget.ts"

/** Run counts read the whole runs table, so a scrape reuses an answer (or a failure) younger than this. */
export const runCountsMaxAgeMs = 15_000

export interface RunCountsView {
  /** The last counts read; undefined before the first success. */
  readonly counts: ReadonlyArray<RunCount> | undefined
  /** Whether the latest attempt succeeded. */
  readonly up: boolean
  /** Age of `counts`; undefined with them. */
  readonly ageSeconds: number | undefined
}

export const makeRunCountsCache = (
  count: Effect.Effect<ReadonlyArray<RunCount>, DatabaseError>,
  budget: ProbeBudget
): Effect.Effect<RunCountsView> => {
  let last: { readonly at: number; readonly counts: ReadonlyArray<RunCount> } | undefined
  let up = false
  let counting = false
  let lastAttempt = -Infinity

  const view = Effect.sync((): RunCountsView => ({
    counts: last?.counts,
    up,
    ageSeconds: last === undefined ? undefined : (Date.now() - last.at) / 1000
  }))

  const refresh = Effect.suspend(() => {
    lastAttempt = Date.now()
    return count.pipe(
      Effect.tap((counts) =>
        Effect.sync(() => {
          last = { at: Date.now(), counts }
          up = true
        })
      ),
      Effect.catch((error) =>
        Effect.sync(() => (up = false)).pipe(
          Effect.andThen(Effect.logWarning("run counts for /metrics could not be read", { message: error.message }))
        )
      )
    )
  })

  return Effect.suspend(() => {
    if (counting || Date.now() - lastAttempt < runCountsMaxAgeMs) return view
    // Set before anything yields, so a scrape in the same tick finds the count in flight.
    counting = true
    // The scrape that starts the count waits for it (its statement timeout, plus the round trip).
    return budget.run(refresh, countsTimeoutMs + 1_000, Effect.sync(() => (counting = false))).pipe(
      Effect.andThen(view)
    )
  })
}
