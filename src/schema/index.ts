/** The single source of the database shape; drizzle-kit generates `drizzle/` from these tables. */
export * from "./runs.ts"
export * from "./transcriptSnapshots.ts"
export * from "./backfills.ts"
