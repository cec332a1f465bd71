/**
 * `agent_transcript_snapshots`: a worker's session transcript (JSONL), one row per run, first writer wins.
 *
 * The run reference is ON DELETE RESTRICT, not CASCADE: the reference system's retention deleted old
 * runs and, through the cascade, the whole hydrate history of every conversation idle for longer than
 * its 30-day window. Here deleting a run that still has a snapshot fails with a foreign-key violation
 * (SQLSTATE 23503), so a transcript can only go away by being deleted on purpose (`reset`, or a
 * retention pass that deletes superseded snapshots first and keeps each conversation's latest).
 */
import { sql } from "drizzle-orm"
import { bigint, check, integer, pgTable, text, timestamp, unique } from "drizzle-orm/pg-core"
import { runs } from "./runs.ts"

export const terminalStatuses = ["completed", "failed", "timeout", "cancelled"] as const
export type TerminalStatus = (typeof terminalStatuses)[number]

export const agentTranscriptSnapshots = pgTable(
  "agent_transcript_snapshots",
  {
    id: bigint("id", { mode: "number" }).primaryKey().generatedAlwaysAsIdentity(),
    organizationId: text("organization_id").notNull(),
    agentId: text("agent_id").notNull(),
    conversationId: text("conversation_id").notNull(),
    runId: bigint("run_id", { mode: "number" })
      .notNull()
      .references(() => runs.id, { onDelete: "restrict" }),
    snapshotJsonl: text("snapshot_jsonl").notNull(),
    byteSize: integer("byte_size").notNull(),
    terminalStatus: text("terminal_status", { enum: terminalStatuses }).notNull(),
    createdAt: timestamp("created_at", { withTimezone: true, mode: "date" }).notNull().defaultNow()
  },
  (t) => [
    check(
      "agent_transcript_snapshots_terminal_status_check",
      sql`${t.terminalStatus} in ('completed', 'failed', 'timeout', 'cancelled')`
    ),
    check("agent_transcript_snapshots_byte_size_check", sql`${t.byteSize} >= 0`),
    // First writer wins per run. Its btree also serves "latest completed snapshot of a conversation":
    // equality on the first three columns, then a backward scan of run_id, so no second index is kept.
    unique("agent_transcript_snapshots_run_key").on(t.organizationId, t.agentId, t.conversationId, t.runId)
  ]
)

export type AgentTranscriptSnapshot = typeof agentTranscriptSnapshots.$inferSelect
