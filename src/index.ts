/**
 * runlane: the Postgres layer of an AI-agent orchestrator.
 *
 * One namespace per module; the schema tables are also exported flat for Drizzle queries.
 */
export * as Database from "./db/Database.ts"
export * as DatabaseError from "./db/DatabaseError.ts"
export * as EmbeddedPostgres from "./db/EmbeddedPostgres.ts"
export * as Http from "./http/server.ts"
export * as RunlaneApi from "./http/RunlaneApi.ts"
export * as Backfills from "./backfills/Backfills.ts"
export * as ConversationLocks from "./locks/ConversationLocks.ts"
export * as LockKey from "./locks/lockKey.ts"
export * as Migrator from "./db/Migrator.ts"
export * as RunOwnership from "./ownership/RunOwnership.ts"
export * as WorkerTokens from "./ownership/WorkerTokens.ts"
export * as RunInput from "./runs/runInput.ts"
export * as RunsQueue from "./runs/RunsQueue.ts"
export * as RunRetention from "./runs/RunRetention.ts"
export * as RunWorker from "./runs/RunWorker.ts"
export * as Schema from "./schema/index.ts"
export * as Service from "./service.ts"
export * as TranscriptSnapshots from "./snapshots/TranscriptSnapshots.ts"
export { agentTranscriptSnapshots, backfills, runs } from "./schema/index.ts"
