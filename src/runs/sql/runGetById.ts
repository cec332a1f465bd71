/**
 * runGetById: one run's dispatch state, for operators (GET /v1/runs/{id}).
 *
 * Shape: a primary-key SELECT of the columns that say where a run is in its life; timestamps as text,
 * so the pool's date parsers (Drizzle replaces them) cannot change what is read.
 */
import type { RunsClient } from "./runsClient.ts"

export interface RunStateRow {
  readonly id: string
  readonly queue: string
  readonly status: string
  readonly attempts: number
  readonly max_attempts: number
  readonly run_at: string
  readonly error_message: string | null
  readonly claimed_by: string | null
  readonly lease_expires_at: string | null
  readonly cancel_requested_at: string | null
  readonly created_at: string
  readonly completed_at: string | null
}

export const runGetById = (client: RunsClient, id: number) =>
  client<Array<RunStateRow>>`
    select id::text, queue, status, attempts, max_attempts, run_at::text, error_message, claimed_by,
           lease_expires_at::text, cancel_requested_at::text, created_at::text, completed_at::text
      from runs where id = ${id}`
