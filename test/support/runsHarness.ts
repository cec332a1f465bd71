/**
 * The harness of the claim and settle tests: a clock the test moves (injected into RunsQueue, so
 * retry delays, run_at, expiry and leases are tested without waiting), a migrated database of its own,
 * and a reader of a run's row as the database holds it.
 */
import { Effect, Exit, Layer, Scope } from "effect"
import { Database } from "../../src/db/Database.ts"
import type { SendRunInput } from "../../src/runs/runInput.ts"
import { RunWorker, type RunWorkerOptions } from "../../src/runs/RunWorker.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import type { RunsQueueOptions } from "../../src/runs/runsConfig.ts"
import { testDatabaseLayer } from "./testDatabase.ts"

export interface MovableClock {
  readonly now: () => Date
  readonly advance: (ms: number) => void
}

/**
 * Starts a minute ahead of the database clock, so runs sent with the default run_at (the database's
 * now()) are already due on it.
 */
export const movableClock = (): MovableClock => {
  let current = Date.now() + 60_000
  return { now: () => new Date(current), advance: (ms) => (current += ms) }
}

export const runsTestLayer = (clock: MovableClock, options: RunsQueueOptions = {}) =>
  RunsQueue.layerWith({ now: clock.now, ...options }).pipe(Layer.provideMerge(testDatabaseLayer()))

let queues = 0
/** A queue name no other test of the file uses, so tests sharing a database do not see each other's runs. */
export const freshQueue = (name: string): string => `${name}-${++queues}`

export const runInput = (queue: string, extra: Partial<SendRunInput> = {}): SendRunInput => ({
  queue,
  organizationId: "org-1",
  payload: { n: 1 },
  ...extra
})

export interface StoredRun {
  readonly status: string
  readonly attempts: number
  readonly run_at: Date
  readonly completed_at: Date | null
  readonly error_message: string | null
  readonly claimed_by: string | null
  readonly lease_expires_at: Date | null
  readonly cancel_requested_at: Date | null
}

export const readRun = (id: number) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const [row] = yield* use("test.readRun", (sql) =>
      sql<Array<Record<string, string | number | null>>>`
        select status, attempts, run_at::text, completed_at::text, error_message, claimed_by,
               lease_expires_at::text, cancel_requested_at::text
          from runs where id = ${id}`)
    const date = (value: unknown) => (value === null ? null : new Date(String(value)))
    return {
      status: String(row!["status"]),
      attempts: Number(row!["attempts"]),
      run_at: date(row!["run_at"])!,
      completed_at: date(row!["completed_at"]),
      error_message: row!["error_message"] as string | null,
      claimed_by: row!["claimed_by"] as string | null,
      lease_expires_at: date(row!["lease_expires_at"]),
      cancel_requested_at: date(row!["cancel_requested_at"])
    } satisfies StoredRun
  })

/** Starts a worker in a scope of its own; closing that scope (`stop`) stops it. */
export const startWorker = (options: RunWorkerOptions<never>) =>
  Effect.gen(function*() {
    const worker = yield* RunWorker
    const scope = yield* Scope.make()
    yield* worker.start(options).pipe(Scope.provide(scope))
    return { stop: Scope.close(scope, Exit.void) }
  })
