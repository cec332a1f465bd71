/**
 * The `runs` table: one row per unit of agent work.
 *
 * A run moves pending -> claimed -> completed | failed | cancelled (a retry, a deferral, a release or an
 * expired lease moves it from claimed back to pending; a pending run can be cancelled). The scope
 * columns (organization_id, agent_id, conversation_id) are written on insert, so ownership checks and
 * per-conversation queries never have to look inside `action_input`.
 *
 * `legacy_scope` marks rows written by an older writer, which may hold their scope only in
 * `action_input`. The database defaults it to true; runlane's own inserts always write false, so a run
 * created by runlane gets its scope from its columns alone. `npm run db:backfill -- runs_legacy_scope`
 * copies a legacy row's scope into its columns and clears the mark. Its partial index
 * `runs_legacy_scope_idx (id) WHERE legacy_scope` is built CONCURRENTLY by the custom migration
 * 0002_runs_legacy_scope_index, so it is not declared here (drizzle-kit would build it in a transaction).
 */
import { sql } from "drizzle-orm"
import { bigint, boolean, check, index, integer, jsonb, pgTable, text, timestamp, uniqueIndex, uuid } from "drizzle-orm/pg-core"

export const runStatuses = ["pending", "claimed", "completed", "failed", "cancelled"] as const
export type RunStatus = (typeof runStatuses)[number]

export type JsonValue = string | number | boolean | null | ReadonlyArray<JsonValue> | { readonly [key: string]: JsonValue }
export type JsonObject = { readonly [key: string]: JsonValue }

const timestamptz = (name: string) => timestamp(name, { withTimezone: true, mode: "date" })

export const runs = pgTable(
  "runs",
  {
    // By default, not always: sendMany draws ids with nextval() before inserting so it can answer in input order.
    id: bigint("id", { mode: "number" }).primaryKey().generatedByDefaultAsIdentity(),
    organizationId: text("organization_id").notNull(),
    agentId: text("agent_id"),
    conversationId: text("conversation_id"),
    // A constant default is metadata-only in PostgreSQL >= 11: adding it never rewrites the table.
    legacyScope: boolean("legacy_scope").notNull().default(true),
    queue: text("queue").notNull(),
    status: text("status", { enum: runStatuses }).notNull().default("pending"),
    actionInput: jsonb("action_input").$type<JsonObject>().notNull(),
    priority: integer("priority").notNull().default(0),
    runAt: timestamptz("run_at").notNull().defaultNow(),
    expiresAt: timestamptz("expires_at"),
    attempts: integer("attempts").notNull().default(0),
    maxAttempts: integer("max_attempts").notNull().default(3),
    // NULL means exponential backoff.
    retryDelaySeconds: integer("retry_delay_seconds"),
    idempotencyKey: text("idempotency_key"),
    claimedBy: text("claimed_by"),
    claimedAt: timestamptz("claimed_at"),
    // One claim of the run (a fresh UUID per claim): settles and heartbeats name the claim they are for,
    // so one meant for an earlier claim of the same worker process matches nothing.
    claimId: uuid("claim_id"),
    // The claim is the sweep's to take back after this instant; a heartbeat moves it on.
    leaseExpiresAt: timestamptz("lease_expires_at"),
    // Set by cancel() on a claimed run: its worker's next heartbeat or settle ends it `cancelled`.
    cancelRequestedAt: timestamptz("cancel_requested_at"),
    completedAt: timestamptz("completed_at"),
    errorMessage: text("error_message"),
    createdAt: timestamptz("created_at").notNull().defaultNow()
  },
  (t) => [
    check("runs_status_check", sql`${t.status} in ('pending', 'claimed', 'completed', 'failed', 'cancelled')`),
    // The reference system stored JSON strings here for weeks; the database now refuses anything but an object.
    check("runs_action_input_object_check", sql`jsonb_typeof(${t.actionInput}) = 'object'`),
    check("runs_attempts_check", sql`${t.attempts} >= 0 and ${t.maxAttempts} >= 1`),
    check("runs_retry_delay_check", sql`${t.retryDelaySeconds} is null or ${t.retryDelaySeconds} >= 0`),
    // A claimed run always names its owner; no other status has one.
    check(
      "runs_claim_owner_check",
      sql`(${t.status} = 'claimed') = (${t.claimedBy} is not null and ${t.claimedAt} is not null)`
    ),
    // The claim path: the next pending run of a queue, highest priority first, then oldest run_at.
    index("runs_claim_idx")
      .on(t.queue, t.priority.desc(), t.runAt, t.id)
      .where(sql`${t.status} = 'pending'`),
    // At most one claimed run per conversation and queue, whatever the claimers' snapshots and clocks
    // saw: the claim statement's own checks make a conflict rare, and the claim retries on one
    // (runClaimAvailable.ts). agent_id may be NULL and '' is never a valid id, so coalesce makes NULL
    // one conversation.
    uniqueIndex("runs_conversation_claimed_uniq")
      .on(t.queue, t.organizationId, sql`coalesce(${t.agentId}, '')`, t.conversationId)
      .where(sql`${t.status} = 'claimed' and ${t.conversationId} is not null`),
    // A conversation's pending runs of a queue in order: "is there an older pending run" is one index probe.
    index("runs_conversation_pending_idx")
      .on(t.queue, t.organizationId, sql`coalesce(${t.agentId}, '')`, t.conversationId, t.id)
      .where(sql`${t.status} = 'pending' and ${t.conversationId} is not null`),
    // The sweep: claims whose lease has run out.
    index("runs_lease_idx").on(t.leaseExpiresAt).where(sql`${t.status} = 'claimed'`),
    // Idempotency keys dedupe per organization only while the run is not terminal.
    uniqueIndex("runs_idempotency_key_uniq")
      .on(t.organizationId, t.idempotencyKey)
      .where(sql`${t.idempotencyKey} is not null and ${t.status} in ('pending', 'claimed')`),
    // Runs of a conversation, newest first.
    index("runs_conversation_idx")
      .on(t.organizationId, t.agentId, t.conversationId, t.id.desc())
      .where(sql`${t.conversationId} is not null`)
  ]
)

export type Run = typeof runs.$inferSelect
