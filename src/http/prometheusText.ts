/**
 * Pure: conversation-lock usage and run counts in the Prometheus text exposition format (0.0.4).
 * HTTP metrics come from Effect's metric registry instead (see httpMetrics.ts).
 */
import type { LocalLockUsage } from "../locks/ConversationLocks.ts"
import type { UploadQueueUsage } from "../snapshots/TranscriptSnapshots.ts"
import type { RunCountsView } from "./runCountsCache.ts"

const escapeLabel = (value: string): string => value.replace(/\\/g, "\\\\").replace(/"/g, "\\\"").replace(/\n/g, "\\n")

const metric = (name: string, type: "gauge" | "counter", help: string, samples: ReadonlyArray<string>): string =>
  `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${samples.join("\n")}\n`

export const lockMetricsText = (usage: LocalLockUsage): string =>
  [
    metric("runlane_conversation_locks_reserved", "gauge", "Connections pinned for conversation locks (held, in flight, stranded)", [
      `runlane_conversation_locks_reserved ${usage.held + usage.inFlight + usage.stranded}`
    ]),
    metric("runlane_conversation_locks_cap", "gauge", "Most connections this process may pin for conversation locks", [
      `runlane_conversation_locks_cap ${usage.cap}`
    ]),
    metric("runlane_conversation_locks_near_cap", "gauge", "1 when reserved locks reach 80% of the cap", [
      `runlane_conversation_locks_near_cap ${usage.nearCap ? 1 : 0}`
    ]),
    metric("runlane_conversation_locks_held", "gauge", "Conversation locks held", [
      `runlane_conversation_locks_held ${usage.held}`
    ]),
    metric("runlane_conversation_locks_stranded", "gauge", "Sessions that may still hold a lock, being terminated (count against the cap)", [
      `runlane_conversation_locks_stranded ${usage.stranded}`
    ]),
    metric("runlane_conversation_locks_oldest_hold_seconds", "gauge", "Age of the oldest held lock (0 when none)", [
      `runlane_conversation_locks_oldest_hold_seconds ${(usage.oldestHoldMs ?? 0) / 1000}`
    ]),
    metric("runlane_conversation_locks_acquired_total", "counter", "Conversation locks acquired", [
      `runlane_conversation_locks_acquired_total ${usage.acquired}`
    ]),
    metric("runlane_conversation_locks_busy_total", "counter", "Acquires refused because another session held the lock", [
      `runlane_conversation_locks_busy_total ${usage.busy}`
    ]),
    metric("runlane_conversation_locks_cap_reached_total", "counter", "Acquires refused at the cap", [
      `runlane_conversation_locks_cap_reached_total ${usage.capReached}`
    ]),
    metric("runlane_conversation_locks_lost_total", "counter", "Held locks whose session died", [
      `runlane_conversation_locks_lost_total ${usage.lost}`
    ])
  ].join("")

/** The last counts read (none before the first success); `_up` says whether the latest attempt succeeded. */
export const runCountsText = ({ ageSeconds, counts, up }: RunCountsView): string =>
  metric("runlane_runs_count_up", "gauge", "1 when the latest attempt to count runs succeeded", [
    `runlane_runs_count_up ${up ? 1 : 0}`
  ]) +
  (ageSeconds === undefined ? "" : metric("runlane_runs_count_age_seconds", "gauge", "Age of the run counts below", [
    `runlane_runs_count_age_seconds ${ageSeconds}`
  ])) +
  (counts === undefined || counts.length === 0 ? "" : metric(
    "runlane_runs",
    "gauge",
    "Runs by queue and status",
    counts.map((c) => `runlane_runs{queue="${escapeLabel(c.queue)}",status="${escapeLabel(c.status)}"} ${c.count}`)
  ))

export const uploadQueueText = (usage: UploadQueueUsage): string =>
  [
    metric("runlane_snapshot_uploads_queued", "gauge", "Snapshot uploads waiting for a statement", [
      `runlane_snapshot_uploads_queued ${usage.queued}`
    ]),
    metric("runlane_snapshot_uploads_queued_bytes", "gauge", "Snapshot bytes waiting for a statement", [
      `runlane_snapshot_uploads_queued_bytes ${usage.queuedBytes}`
    ]),
    metric("runlane_snapshot_upload_statements", "gauge", "Snapshot upload statements running", [
      `runlane_snapshot_upload_statements ${usage.statementsInFlight}`
    ])
  ].join("")
