/**
 * Pure: the command line of `npm run db:backfill -- <name> [--batch-size=N] [--rate=N]`.
 */
import { Schema } from "effect"
import { backfillDefaults } from "./Backfills.ts"

export class BackfillArgumentError extends Schema.TaggedError<BackfillArgumentError>()("BackfillArgumentError", {
  argument: Schema.String,
  message: Schema.String
}) {}

/** Pure: the command line after `--`. */
export const parseBackfillArguments = (args: ReadonlyArray<string>) => {
  const names = args.filter((arg) => !arg.startsWith("--"))
  if (names.length !== 1) {
    return new BackfillArgumentError({ argument: "name", message: "give exactly one backfill name, e.g. npm run db:backfill -- runs_legacy_scope" })
  }
  const options = { name: names[0]!, batchSize: backfillDefaults.batchSize, rowsPerSecond: backfillDefaults.rowsPerSecond }
  for (const arg of args.filter((candidate) => candidate.startsWith("--"))) {
    const [flag, value = ""] = arg.split("=", 2) as [string, string?]
    const number = /^[0-9]{1,9}$/.test(value) ? Number(value) : Number.NaN
    if (flag === "--batch-size" && number >= 1) options.batchSize = number
    else if (flag === "--rate" && number >= 0) options.rowsPerSecond = number
    else {
      return new BackfillArgumentError({
        argument: flag,
        message: `${arg} is not understood: use --batch-size=<rows, 1 or more> or --rate=<rows per second, 0 for no limit>`
      })
    }
  }
  return options
}

