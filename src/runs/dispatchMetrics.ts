/**
 * What the work loop and the sweep did, as Effect metrics that /metrics renders beside the HTTP ones.
 * Every series is labelled by queue only (queues are the operator's names, chosen when a worker is
 * started, so the label set stays small); the sweep is not per queue.
 *
 * Counters count what the database confirmed: a settle that found its run lost is counted as lost, not
 * as completed.
 */
import { Effect, Metric } from "effect"

const claimed = Metric.counter("runlane_runs_claimed_total", { description: "Runs claimed by this process's workers, by queue" })
const completed = Metric.counter("runlane_runs_completed_total", { description: "Runs completed, by queue" })
const failedAttempts = Metric.counter("runlane_runs_failed_attempts_total", {
  description: "Attempts that failed (the run retries, or ends failed at its last attempt), by queue"
})
const deferred = Metric.counter("runlane_runs_deferred_total", {
  description: "Runs put back without spending an attempt, by queue and reason (conversation_busy, lock_cap, lock_error, handler)"
})
const released = Metric.counter("runlane_runs_released_total", {
  description: "Runs handed back to pending at once (handler answer, lock lost mid-run, worker stopping), by queue"
})
const lost = Metric.counter("runlane_runs_lease_lost_total", {
  description: "Claimed runs this process found no longer its own (swept, or settled elsewhere), by queue"
})
const cancelled = Metric.counter("runlane_runs_cancelled_while_claimed_total", {
  description: "Claimed runs whose cancellation this process's workers applied, by queue"
})
const swept = Metric.counter("runlane_runs_swept_total", {
  description: "Expired claims taken back by the sweep, by outcome (returned to pending with the attempt counted, failed at the last attempt, cancelled)"
})

/**
 * Seconds from a run's enqueue (created_at) to the start of its handler, for first attempts only (a
 * retry's wait includes its backoff). A run enqueued for later counts its scheduled wait too. From 5 ms
 * (an idle worker woken by NOTIFY) to 5 minutes (a backlog).
 */
const startLatency = Metric.histogram("runlane_run_start_latency_seconds", {
  description: "Seconds from enqueue to the start of a run's first attempt, by queue",
  boundaries: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]
})

export type DeferReason = "conversation_busy" | "lock_cap" | "lock_error" | "handler"

/** One queue's series, made once per worker: building a labelled metric per update costs. */
export const dispatchMetricsFor = (queue: string) => {
  const deferredBy = {
    conversation_busy: Metric.withAttributes(deferred, { queue, reason: "conversation_busy" }),
    lock_cap: Metric.withAttributes(deferred, { queue, reason: "lock_cap" }),
    lock_error: Metric.withAttributes(deferred, { queue, reason: "lock_error" }),
    handler: Metric.withAttributes(deferred, { queue, reason: "handler" })
  } satisfies Record<DeferReason, Metric.Counter<number>>
  const series = {
    claimed: Metric.withAttributes(claimed, { queue }),
    completed: Metric.withAttributes(completed, { queue }),
    failedAttempts: Metric.withAttributes(failedAttempts, { queue }),
    released: Metric.withAttributes(released, { queue }),
    lost: Metric.withAttributes(lost, { queue }),
    cancelled: Metric.withAttributes(cancelled, { queue }),
    startLatency: Metric.withAttributes(startLatency, { queue })
  }
  const add = (counter: Metric.Counter<number>, n: number) => (n === 0 ? Effect.void : Metric.update(counter, n))
  return {
    claimed: (n: number) => add(series.claimed, n),
    completed: (n: number) => add(series.completed, n),
    failedAttempts: (n: number) => add(series.failedAttempts, n),
    deferred: (reason: DeferReason, n: number) => add(deferredBy[reason], n),
    released: (n: number) => add(series.released, n),
    lost: (n: number) => add(series.lost, n),
    cancelled: (n: number) => add(series.cancelled, n),
    started: (latencySeconds: number) => Metric.update(series.startLatency, latencySeconds)
  }
}

export type DispatchMetrics = ReturnType<typeof dispatchMetricsFor>

const sweptBy = {
  returned: Metric.withAttributes(swept, { outcome: "returned" }),
  failed: Metric.withAttributes(swept, { outcome: "failed" }),
  cancelled: Metric.withAttributes(swept, { outcome: "cancelled" })
}

/** What one sweep did. */
export const recordSweep = (result: { readonly returned: number; readonly failed: number; readonly cancelled: number }) =>
  Effect.all([
    result.returned === 0 ? Effect.void : Metric.update(sweptBy.returned, result.returned),
    result.failed === 0 ? Effect.void : Metric.update(sweptBy.failed, result.failed),
    result.cancelled === 0 ? Effect.void : Metric.update(sweptBy.cancelled, result.cancelled)
  ], { discard: true })
