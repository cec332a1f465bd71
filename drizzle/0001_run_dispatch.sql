ALTER TABLE "runs" ADD COLUMN "lease_expires_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "runs" ADD COLUMN "cancel_requested_at" timestamp with time zone;--> statement-breakpoint
CREATE UNIQUE INDEX "runs_conversation_claimed_uniq" ON "runs" USING btree ("queue","organization_id",coalesce("agent_id", ''),"conversation_id") WHERE "runs"."status" = 'claimed' and "runs"."conversation_id" is not null;--> statement-breakpoint
CREATE INDEX "runs_conversation_pending_idx" ON "runs" USING btree ("queue","organization_id",coalesce("agent_id", ''),"conversation_id","id") WHERE "runs"."status" = 'pending' and "runs"."conversation_id" is not null;--> statement-breakpoint
CREATE INDEX "runs_lease_idx" ON "runs" USING btree ("lease_expires_at") WHERE "runs"."status" = 'claimed';