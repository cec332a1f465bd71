-- Nullable and without a default: a catalog-only change, no rewrite of a big runs table.
ALTER TABLE "runs" ADD COLUMN "claim_id" uuid;