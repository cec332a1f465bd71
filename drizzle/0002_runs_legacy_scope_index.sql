-- Custom SQL migration file, put your code below! --
-- runlane:no-transaction
-- The rows still marked legacy_scope, for the backfill's keyset batches and the readiness check. Built
-- CONCURRENTLY (writers keep writing; the Migrator runs this file outside any transaction and rebuilds
-- the index if an earlier build was interrupted). Partial: runs written by runlane are never in it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS "runs_legacy_scope_idx" ON "runs" ("id") WHERE "legacy_scope";
