/**
 * Migration files as the Migrator reads them: the drizzle-kit journal, each file's statements, and
 * whether the file must run outside a transaction. Pure (no database), so the rules are tested alone.
 *
 * A file that holds `CREATE INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY` or any other statement that
 * PostgreSQL refuses inside a transaction block is written with `drizzle-kit generate --custom` and
 * carries the marker line `-- runlane:no-transaction`. Its statements, separated by drizzle's
 * `--> statement-breakpoint`, then run one by one in autocommit, and the file is recorded only after
 * the last one succeeded: a run stopped halfway runs the whole file again, so every statement in it
 * must be safe to repeat (`IF NOT EXISTS`, `IF EXISTS`).
 */
import { createHash } from "node:crypto"
import { readFileSync } from "node:fs"
import { Schema } from "effect"

export const noTransactionMarker = "-- runlane:no-transaction"

/** Lines starting with this are runlane directives; an unknown one is refused rather than ignored. */
const directivePrefix = "-- runlane:"

const statementBreakpoint = "--> statement-breakpoint"

export class MigrationError extends Schema.TaggedError<MigrationError>()("MigrationError", {
  migration: Schema.String,
  message: Schema.String
}) {}

export interface JournalEntry {
  readonly tag: string
  readonly when: number
  /** sha256 of the whole file, exactly as drizzle's migrator records it. */
  readonly hash: string
  /** Statements in file order, without empty ones. */
  readonly statements: ReadonlyArray<string>
  /** false for a file marked `-- runlane:no-transaction`. */
  readonly transactional: boolean
}

export interface MigrationStatus {
  /** Tags of the migrations recorded as applied, oldest first. */
  readonly applied: ReadonlyArray<string>
  /** Tags that `migrate` would apply, oldest first. */
  readonly pending: ReadonlyArray<string>
}

/** Pure: a file's statements and whether it runs in a transaction, or why it cannot be run. */
export const parseMigration = (
  tag: string,
  text: string
): { readonly statements: ReadonlyArray<string>; readonly transactional: boolean } | MigrationError => {
  const directives = text.split("\n").map((line) => line.trim()).filter((line) => line.startsWith(directivePrefix))
  const unknown = directives.find((line) => line !== noTransactionMarker)
  if (unknown !== undefined) {
    return new MigrationError({
      migration: tag,
      message: `unknown directive "${unknown}" in ${tag}; the only one is "${noTransactionMarker}"`
    })
  }
  const statements = text.split(statementBreakpoint).map((statement) => statement.trim()).filter((statement) =>
    statement.split("\n").some((line) => line.trim() !== "" && !line.trim().startsWith("--"))
  )
  return { statements, transactional: directives.length === 0 }
}

/** Reads the journal and each file it names; hashes each file as drizzle's migrator does. */
export const readJournal = (folder: string): ReadonlyArray<JournalEntry> => {
  const journal = JSON.parse(readFileSync(`${folder}/meta/_journal.json`, "utf8")) as {
    entries: ReadonlyArray<{ tag: string; when: number }>
  }
  return journal.entries.map((entry) => {
    const text = readFileSync(`${folder}/${entry.tag}.sql`, "utf8")
    const parsed = parseMigration(entry.tag, text)
    if (parsed instanceof MigrationError) throw parsed
    return { tag: entry.tag, when: entry.when, hash: createHash("sha256").update(text).digest("hex"), ...parsed }
  })
}

export interface AppliedRow {
  readonly hash: string
  readonly created_at: string
}

/**
 * Compares the journal with the ledger. Pure, so the refusal rules are tested without a database.
 * Fails when a journal entry is older than the newest applied one but was never applied (drizzle would
 * skip it forever), or when an applied migration's file no longer hashes to what was applied.
 */
export const compareJournal = (
  journal: ReadonlyArray<Pick<JournalEntry, "tag" | "when" | "hash">>,
  appliedRows: ReadonlyArray<AppliedRow>
): MigrationStatus | MigrationError => {
  for (let i = 1; i < journal.length; i++) {
    if (journal[i]!.when <= journal[i - 1]!.when) {
      return new MigrationError({
        migration: journal[i]!.tag,
        message: `journal entry ${journal[i]!.tag} is not newer than ${journal[i - 1]!.tag}; regenerate it`
      })
    }
  }
  const appliedByTime = new Map(appliedRows.map((row) => [Number(row.created_at), row.hash]))
  const lastApplied = Math.max(0, ...appliedByTime.keys())
  const applied: Array<string> = []
  const pending: Array<string> = []
  for (const entry of journal) {
    const appliedHash = appliedByTime.get(entry.when)
    if (entry.when > lastApplied) {
      pending.push(entry.tag)
    } else if (appliedHash === undefined) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} is dated before the last applied migration and was never applied`
      })
    } else if (appliedHash !== entry.hash) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} was edited after it was applied; add a new migration instead`
      })
    } else {
      applied.push(entry.tag)
    }
  }
  return { applied, pending }
}

const concurrentIndexPattern =
  /^\s*create\s+(?:unique\s+)?index\s+concurrently\s+(?:if\s+not\s+exists\s+)?((?:"[^"]+"|[a-z_][\w$]*)(?:\.(?:"[^"]+"|[a-z_][\w$]*))?)/i

/**
 * Pure: the index a `CREATE [UNIQUE] INDEX CONCURRENTLY` statement builds, as written (quotes kept, so
 * `to_regclass` resolves it as PostgreSQL would), or undefined for any other statement. An interrupted
 * concurrent build leaves this index behind, INVALID: the Migrator drops it before building again.
 */
export const concurrentIndexName = (statement: string): string | undefined => {
  const withoutComments = statement.split("\n").filter((line) => !line.trim().startsWith("--")).join("\n")
  return concurrentIndexPattern.exec(withoutComments)?.[1]
}
