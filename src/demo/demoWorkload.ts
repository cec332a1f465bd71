/**
 * `npm run demo`'s workload against a running service: enqueue `runs` runs over `conversations`
 * conversations through the admin API (each conversation's runs interleaved with the others', as chat
 * traffic arrives), watch the database until every one has finished, then audit what happened.
 *
 * What the summary claims comes from the database, not from the driver's beliefs:
 * - in flight: every 50 ms, the most runs of one conversation that are `claimed` at once;
 * - order: each conversation's runs, ordered by when they finished, must be in id (enqueue) order;
 * - hydration: each conversation's final transcript must hold one turn per run, in enqueue order (a
 *   turn served out of order or twice at once would hydrate from a stale transcript and drop a turn);
 * - latency and retries from the runs' own rows; deferrals and cap hits from the service's /metrics.
 */
import postgres from "postgres"
import { type DemoSummary, metricSum, percentile } from "./demoReport.ts"
import type { DemoTurn } from "./demoHandler.ts"

export interface DemoOptions {
  readonly baseUrl: string
  readonly adminToken: string
  /** The queue the service's worker works. */
  readonly queue: string
  readonly runs: number
  readonly conversations: number
  /** Each run's simulated model call. */
  readonly workMs: number
  /** Every n-th run fails its first attempt (0: none), to show retries. */
  readonly failEvery: number
  /** Gives up waiting for the runs after this long. */
  readonly timeoutMs: number
}

export interface DemoProgress {
  readonly finished: number
  readonly total: number
  readonly elapsedMs: number
}

/** Enqueue requests in flight at once: enough to enqueue 2,000 runs in about a second. */
const enqueueConcurrency = 16
const sampleEveryMs = 50

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

export const runDemoWorkload = async (
  options: DemoOptions,
  sql: postgres.Sql,
  onProgress: (progress: DemoProgress) => void
): Promise<DemoSummary> => {
  const { baseUrl, adminToken, queue } = options
  const admin = async (method: string, path: string, body?: unknown) => {
    const response = await fetch(`${baseUrl}${path}`, {
      method,
      headers: { authorization: `Bearer ${adminToken}`, "content-type": "application/json" },
      ...(body === undefined ? {} : { body: JSON.stringify(body) })
    })
    const text = await response.text()
    if (!response.ok) throw new Error(`${method} ${path} answered ${response.status}: ${text.slice(0, 300)}`)
    return JSON.parse(text) as Record<string, unknown>
  }
  const metrics = () => fetch(`${baseUrl}/metrics`).then((response) => response.text())

  // One agent per demo run, so its conversations (and their transcripts) are its own.
  const agentId = `demo-${Date.now().toString(36)}`
  const organizationId = "demo"
  const before = await metrics()
  const started = Date.now()

  const ids: Array<number> = new Array(options.runs)
  let next = 0
  await Promise.all(Array.from({ length: enqueueConcurrency }, async () => {
    for (let i = next++; i < options.runs; i = next++) {
      const payload = { workMs: options.workMs, ...(options.failEvery > 0 && i % options.failEvery === options.failEvery - 1 ? { failAttempts: 1 } : {}) }
      const answer = await admin("POST", "/v1/runs", {
        queue, organizationId, agentId, conversationId: `conversation-${i % options.conversations}`, payload
      })
      ids[i] = answer["id"] as number
    }
  }))

  const enqueuedMs = Date.now() - started
  let maxInFlight = 0
  for (;;) {
    const [row] = await sql<Array<{ finished: number; in_flight: number }>>`
      select (select count(*)::int from runs
               where queue = ${queue} and agent_id = ${agentId} and status in ('completed', 'failed', 'cancelled')) as finished,
             (select coalesce(max(n), 0)::int from (
                select count(*) as n from runs
                 where queue = ${queue} and agent_id = ${agentId} and status = 'claimed'
                 group by conversation_id) claimed) as in_flight`
    maxInFlight = Math.max(maxInFlight, row!.in_flight)
    onProgress({ finished: row!.finished, total: options.runs, elapsedMs: Date.now() - started })
    if (row!.finished >= options.runs) break
    if (Date.now() - started > options.timeoutMs) {
      throw new Error(`${options.runs - row!.finished} of ${options.runs} runs unfinished after ${options.timeoutMs} ms`)
    }
    await sleep(sampleEveryMs)
  }
  const [finishedAt] = await sql<Array<{ last_ms: number | null }>>`
    select (extract(epoch from max(completed_at)) * 1000)::float8 as last_ms from runs where queue = ${queue} and agent_id = ${agentId}`
  const after = await metrics()

  const [totals] = await sql<Array<{ completed: number; failed: number; retries: number; out_of_order: number }>>`
    select count(*) filter (where status = 'completed')::int as completed,
           count(*) filter (where status = 'failed')::int as failed,
           coalesce(sum(attempts), 0)::int as retries,
           (select count(distinct conversation_id)::int from (
              select conversation_id, id < lag(id) over (partition by conversation_id order by completed_at, id) as early
                from runs where queue = ${queue} and agent_id = ${agentId}) s where early) as out_of_order
      from runs where queue = ${queue} and agent_id = ${agentId}`
  const latencies = await sql<Array<{ ms: number }>>`
    select extract(epoch from completed_at - created_at)::float8 * 1000 as ms
      from runs where queue = ${queue} and agent_id = ${agentId} and status = 'completed' order by 1`
  const sorted = latencies.map((row) => row.ms)

  // Each conversation's transcript, read back as its last run's worker would read it.
  const transcriptProblems: Array<string> = []
  for (let c = 0; c < Math.min(options.conversations, options.runs); c++) {
    const own = ids.filter((_, i) => i % options.conversations === c).sort((a, b) => a - b)
    const { token } = await admin("POST", `/v1/runs/${own.at(-1)}/token`)
    const response = await fetch(`${baseUrl}/worker/transcript/snapshot`, { headers: { authorization: `Bearer ${String(token)}` } })
    const text = response.status === 200 ? await response.text() : ""
    const turns = text.trimEnd().split("\n").filter((line) => line !== "").map((line) => (JSON.parse(line) as DemoTurn).run)
    if (turns.join(",") !== own.join(",")) {
      transcriptProblems.push(`conversation-${c}: turns of runs [${turns.join(", ")}], expected [${own.join(", ")}]`)
    }
  }

  const delta = (name: string, labels: Record<string, string>) => metricSum(after, name, labels) - metricSum(before, name, labels)
  return {
    queue,
    runs: options.runs,
    conversations: options.conversations,
    elapsedMs: (finishedAt?.last_ms ?? Date.now()) - started,
    enqueuedMs,
    completed: totals!.completed,
    failed: totals!.failed,
    retries: totals!.retries,
    deferrals: Object.fromEntries(["conversation_busy", "lock_cap", "lock_error", "handler"].map((reason) =>
      [reason, delta("runlane_runs_deferred_total", { queue, reason })])),
    capHits: delta("runlane_conversation_locks_cap_reached_total", {}),
    latencyMs: { p50: percentile(sorted, 50), p90: percentile(sorted, 90), p99: percentile(sorted, 99), max: sorted.at(-1) ?? 0 },
    maxInFlightPerConversation: maxInFlight,
    conversationsOutOfOrder: totals!.out_of_order,
    transcriptProblems
  }
}
