/**
 * writeRuns: picks the insert statement for a batch of validated runs and answers `{ id, created }`
 * per run, in input order.
 *
 * | runs                       | statement               |
 * |----------------------------|-------------------------|
 * | one                        | runInsertOne            |
 * | many, no idempotency key   | runInsertMany           |
 * | many with keys, or one that conflicted | runInsertManyWithKeys, in rounds |
 *
 * A plain async function, wrapped in one Effect by the caller: each Effect layer on this path costs a
 * measurable share of a send.
 */
import type { RunRecord } from "./runInput.ts"
import { runInsertMany } from "./sql/runInsertMany.ts"
import { runInsertManyWithKeys } from "./sql/runInsertManyWithKeys.ts"
import { runInsertOne } from "./sql/runInsertOne.ts"
import type { RunsClient } from "./sql/runsClient.ts"

export interface SendResult {
  readonly id: number
  /** false when the idempotency key matched a run that is still pending or claimed; `id` is that run. */
  readonly created: boolean
}

/**
 * Rounds of re-sending rows whose idempotency conflict could not be resolved in the statement's
 * snapshot (the conflicting run was committed by another transaction during the statement, or finished
 * right after). Each round either inserts or finds the run; two rounds settle every case but a
 * pathological churn of the same key.
 */
export const maxIdempotencyRounds = 5

export class IdempotencyChurn extends Error {
  constructor() {
    super(`idempotency keys kept changing state over ${maxIdempotencyRounds} attempts`)
  }
}

export const writeRuns = async (client: RunsClient, records: ReadonlyArray<RunRecord>): Promise<Array<SendResult>> => {
  if (records.length === 1) {
    const [row] = await runInsertOne(client, records[0]!)
    if (row !== undefined) return [{ id: Number(row.id), created: true }]
  } else if (records.every((record) => record.idempotency_key === null)) {
    const rows = await runInsertMany(client, records)
    return rows.map((row) => Number(row.id)).sort((a, b) => a - b).map((id) => ({ id, created: true }))
  }
  const results: Array<SendResult> = new Array(records.length)
  // Positions in `records` still to resolve.
  let unresolved = records.map((_, i) => i)
  for (let round = 0; unresolved.length > 0; round++) {
    if (round === maxIdempotencyRounds) throw new IdempotencyChurn()
    const positions = unresolved
    const rows = await runInsertManyWithKeys(client, positions.map((i) => records[i]!))
    unresolved = []
    for (const row of rows) {
      // ordinality counts from 1
      const position = positions[Number(row.ord) - 1]!
      if (row.id === null) unresolved.push(position)
      else results[position] = { id: Number(row.id), created: row.created }
    }
  }
  return results
}
