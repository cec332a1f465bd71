/**
 * Pure: which queued uploads leave together in the next group-commit statement (uploadGroups.ts), and
 * in which order their rows are written.
 *
 * The rules exist because two statements that insert the same keys in opposite orders deadlock: each
 * waits on the other's uncommitted index entry, and PostgreSQL aborts one (40P01) with every upload
 * in it. Seen with `[R1, R2, R3, R2', R1']` when two groups left in the same tick: R1, R2, R3 in one
 * statement, R2', R1' in the other. So:
 * - a run whose statement is still in flight is held back: its second upload waits for the first to
 *   commit, then meets the stored row (ON CONFLICT DO NOTHING) instead of an uncommitted one;
 * - at most one upload per run in a statement (each row of the answer belongs to one upload);
 * - rows go in ascending run id, so statements from other processes (which this one cannot hold
 *   back) always take the keys in the same order and wait on each other at worst, never in a cycle.
 */

export interface GroupingLimits {
  /** Rows per statement. */
  readonly maxRowsPerStatement: number
  /** Snapshot bytes per statement; a single larger snapshot still goes, alone. */
  readonly maxBytesPerStatement: number
}

export interface Groupable {
  readonly row: { readonly runId: number; readonly bytes: number }
  /** Must go in a statement of its own (its group was refused for one row's values). */
  readonly alone: boolean
}

export interface NextGroup<U> {
  /** The next statement's uploads, in ascending run id; empty when everything queued is held back. */
  readonly group: Array<U>
  /** What stays queued, in its previous order. */
  readonly left: Array<U>
}

export const nextGroup = <U extends Groupable>(
  queue: ReadonlyArray<U>,
  runsInFlight: ReadonlySet<number>,
  limits: GroupingLimits
): NextGroup<U> => {
  const group: Array<U> = []
  const left: Array<U> = []
  const runs = new Set<number>()
  let bytes = 0
  let closed = false
  for (const upload of queue) {
    const { runId } = upload.row
    const free = !closed && !runsInFlight.has(runId) && !runs.has(runId)
    const fits = group.length === 0 ||
      (!upload.alone && group.length < limits.maxRowsPerStatement &&
        bytes + upload.row.bytes <= limits.maxBytesPerStatement)
    if (free && fits) {
      group.push(upload)
      runs.add(runId)
      bytes += upload.row.bytes
      closed = upload.alone
    } else {
      left.push(upload)
    }
  }
  group.sort((a, b) => a.row.runId - b.row.runId)
  return { group, left }
}
