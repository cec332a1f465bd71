/**
 * Pure: the progress line `npm run db:backfill` and `npm run demo` write to stderr as they go.
 */

export interface Progress {
  /** Rows looked at by this run. */
  readonly done: number
  /** Rows this run expected to look at when it started (the count after the checkpoint). */
  readonly total: number
  readonly elapsedMs: number
  /** What is counted; "rows" unless told. */
  readonly unit?: string | undefined
}

const barWidth = 24

const count = (n: number) => Math.round(n).toLocaleString("en-US")

const duration = (ms: number): string => {
  const seconds = Math.max(0, Math.round(ms / 1000))
  if (seconds < 60) return `${seconds}s`
  const minutes = Math.floor(seconds / 60)
  if (minutes < 60) return `${minutes}m${String(seconds % 60).padStart(2, "0")}s`
  return `${Math.floor(minutes / 60)}h${String(minutes % 60).padStart(2, "0")}m`
}

/** e.g. `[##########--------------]  42% 4,200/10,000 rows  1,050 rows/s  5s left`. */
export const progressLine = ({ done, total, elapsedMs, unit = "rows" }: Progress): string => {
  // Rows written by an older writer during the run can push `done` past the starting count.
  const shownTotal = Math.max(total, done)
  const fraction = shownTotal === 0 ? 1 : done / shownTotal
  const filled = Math.round(fraction * barWidth)
  const rate = elapsedMs > 0 ? (done * 1000) / elapsedMs : 0
  const left = rate > 0 ? duration(((shownTotal - done) / rate) * 1000) : "?"
  return `[${"#".repeat(filled)}${"-".repeat(barWidth - filled)}] ${String(Math.floor(fraction * 100)).padStart(3)}% ` +
    `${count(done)}/${count(shownTotal)} ${unit}  ${count(rate)} ${unit}/s  ${left} left`
}
