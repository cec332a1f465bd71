-- runlane:no-transaction
-- The dispatch indexes of schema/runs.ts, built CONCURRENTLY so writers keep writing on a big runs table
-- (the Migrator runs this file outside any transaction, one statement at a time, and rebuilds an index
-- an interrupted build left INVALID). All three are partial on claimed or pending runs, so they stay
-- small. The unique one fails to build if two runs of one conversation and queue are already claimed
-- (possible only with runs claimed by an older worker): settle those first (docs/migrations.md).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "runs_conversation_claimed_uniq" ON "runs" USING btree ("queue","organization_id",coalesce("agent_id", ''),"conversation_id") WHERE "runs"."status" = 'claimed' and "runs"."conversation_id" is not null;--> statement-breakpoint
CREATE INDEX CONCURRENTLY IF NOT EXISTS "runs_conversation_pending_idx" ON "runs" USING btree ("queue","organization_id",coalesce("agent_id", ''),"conversation_id","id") WHERE "runs"."status" = 'pending' and "runs"."conversation_id" is not null;--> statement-breakpoint
CREATE INDEX CONCURRENTLY IF NOT EXISTS "runs_lease_idx" ON "runs" USING btree ("lease_expires_at") WHERE "runs"."status" = 'claimed';
