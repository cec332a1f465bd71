/**
 * `runlane_backfills`: one checkpoint row per named backfill (`npm run db:backfill -- <name>`).
 *
 * Each keyset batch updates its rows and this row in one transaction, so `last_id` is exactly the
 * highest id whose batch committed: a backfill stopped at any point (even SIGKILL) resumes after it and
 * processes every row once. `finished_at` is set when a batch finds no row left after `last_id`.
 */
import { bigint, pgTable, text, timestamp } from "drizzle-orm/pg-core"

const timestamptz = (name: string) => timestamp(name, { withTimezone: true, mode: "date" })

export const backfills = pgTable("runlane_backfills", {
  name: text("name").primaryKey(),
  lastId: bigint("last_id", { mode: "number" }).notNull().default(0),
  /** Rows the backfill looked at. */
  rowsDone: bigint("rows_done", { mode: "number" }).notNull().default(0),
  /** Rows it changed. */
  rowsChanged: bigint("rows_changed", { mode: "number" }).notNull().default(0),
  /** Rows it left untouched because they held nothing usable (counted, never guessed at). */
  rowsSkipped: bigint("rows_skipped", { mode: "number" }).notNull().default(0),
  startedAt: timestamptz("started_at").notNull().defaultNow(),
  updatedAt: timestamptz("updated_at").notNull().defaultNow(),
  finishedAt: timestamptz("finished_at")
})
