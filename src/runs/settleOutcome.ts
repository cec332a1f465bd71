/**
 * How a batch settle's answer reads: which runs were settled, which ended `cancelled` because their
 * cancellation was pending, and which were no longer this claimant's (the statement did not return them).
 */

/**
 * A claimed run as the settles need it: its id and, to settle only that claim, its claim token. A
 * ClaimedRun is one. Without a token any claim of this claimant's matches (a run known only by id).
 */
export interface RunRef {
  readonly id: number
  readonly claimToken?: string | undefined
}

export interface SettleOutcome {
  readonly settled: ReadonlyArray<number>
  /** Cancelled by this statement: the worker should treat them as RunCancelled. */
  readonly cancelled: ReadonlyArray<number>
  /** No longer claimed by this claimant (LeaseLost): the sweep took them, or they were settled already. */
  readonly lost: ReadonlyArray<number>
}

export const settleOutcome = (
  ids: ReadonlyArray<number>,
  rows: ReadonlyArray<{ readonly id: string; readonly status: string }>
): SettleOutcome => {
  const answered = new Map(rows.map((row) => [Number(row.id), row.status]))
  const settled: Array<number> = []
  const cancelled: Array<number> = []
  const lost: Array<number> = []
  for (const id of ids) {
    const status = answered.get(id)
    if (status === undefined) lost.push(id)
    else if (status === "cancelled") cancelled.push(id)
    else settled.push(id)
  }
  return { settled, cancelled, lost }
}
