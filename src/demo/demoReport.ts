/**
 * Pure: what `npm run demo` found, as the summary it prints, and the readings it takes from the
 * service's /metrics text.
 */

export interface DemoSummary {
  readonly queue: string
  readonly runs: number
  readonly conversations: number
  /** From the first enqueue to the last run finished. */
  readonly elapsedMs: number
  /** How long enqueueing every run through the admin API took (the workers start on the first). */
  readonly enqueuedMs: number
  readonly completed: number
  readonly failed: number
  /** Attempts spent by failures (each one a retry, unless the run ended failed). */
  readonly retries: number
  /** Runs put back without spending an attempt, by reason, from the service's /metrics. */
  readonly deferrals: Readonly<Record<string, number>>
  /** Conversation lock acquires the cap refused (the service's counter). */
  readonly capHits: number
  /** Enqueue-to-finish latency of the completed runs, in milliseconds. */
  readonly latencyMs: { readonly p50: number; readonly p90: number; readonly p99: number; readonly max: number }
  /** The most runs of one conversation seen claimed at the same moment in the database. */
  readonly maxInFlightPerConversation: number
  /** Conversations whose runs finished in another order than they were enqueued. */
  readonly conversationsOutOfOrder: number
  /** Conversations whose final transcript does not hold each run's turn once, in enqueue order. */
  readonly transcriptProblems: ReadonlyArray<string>
}

/** The p-th percentile (0-100) of ascending `sorted`, nearest rank; 0 when empty. */
export const percentile = (sorted: ReadonlyArray<number>, p: number): number =>
  sorted.length === 0 ? 0 : sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))]!

/**
 * The sum of a metric's samples whose labels include every `labels` pair, from Prometheus text:
 * e.g. `metricSum(text, "runlane_runs_deferred_total", { queue: "demo" })` adds every reason.
 */
export const metricSum = (text: string, name: string, labels: Readonly<Record<string, string>> = {}): number => {
  let total = 0
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue
    const wanted = Object.entries(labels).every(([key, value]) => line.includes(`${key}="${value}"`))
    if (wanted) total += Number(line.slice(line.lastIndexOf(" ") + 1))
  }
  return total
}

const count = (n: number) => Math.round(n).toLocaleString("en-US")

/** The lines the demo ends with; `ok` says whether every check held. */
export const summaryText = (s: DemoSummary): { readonly text: string; readonly ok: boolean } => {
  const rate = s.elapsedMs > 0 ? (s.runs * 1000) / s.elapsedMs : 0
  const deferrals = Object.entries(s.deferrals).filter(([, n]) => n > 0)
  const inOrder = s.conversationsOutOfOrder === 0 && s.transcriptProblems.length === 0
  const ok = s.maxInFlightPerConversation <= 1 && inOrder && s.completed === s.runs
  const lines = [
    `runs:            ${count(s.runs)} over ${count(s.conversations)} conversations on queue "${s.queue}", enqueued in ${(s.enqueuedMs / 1000).toFixed(1)} s`,
    `finished:        ${count(s.completed)} completed, ${count(s.failed)} failed in ${(s.elapsedMs / 1000).toFixed(1)} s: ${count(rate)} runs/s`,
    `retries:         ${count(s.retries)}`,
    `deferrals:       ${deferrals.length === 0 ? "0" : deferrals.map(([reason, n]) => `${count(n)} ${reason}`).join(", ")}`,
    `lock cap hits:   ${count(s.capHits)}`,
    `enqueue→finish:  p50 ${count(s.latencyMs.p50)} ms, p90 ${count(s.latencyMs.p90)} ms, p99 ${count(s.latencyMs.p99)} ms, max ${count(s.latencyMs.max)} ms`,
    `in flight:       at most ${s.maxInFlightPerConversation} run(s) of one conversation at once (from the database; must be 1)`,
    `order:           ${inOrder ? "every conversation's runs finished in enqueue order" : `${count(s.conversationsOutOfOrder)} conversation(s) finished out of order`}`,
    ...s.transcriptProblems.slice(0, 10).map((problem) => `  transcript: ${problem}`),
    ok ? "result:          ok" : "result:          FAILED"
  ]
  return { text: `${lines.join("\n")}\n`, ok }
}
