/**
 * Group commit for snapshot uploads (`TranscriptSnapshots.putIfRunInScope`).
 *
 * Under load, uploads arrive while earlier ones are still in the database. Sent one statement each,
 * every upload pays its own statement, round trip and commit, in PostgreSQL and in Node alike
 * (`npm run bench` reports PostgreSQL's CPU per upload beside a one-statement-each upload written by
 * hand; the choice of 4 statements in flight was measured against 1, 2 and unbounded there, 1 KB
 * snapshots, 16 uploads in flight). So uploads queue here, and whenever fewer than
 * `maxStatementsInFlight` statements are running, the queue leaves as one INSERT … SELECT. A lone upload
 * on an idle service is sent in the same tick: grouping adds no waiting, it forms only while
 * statements are already in flight. It also bounds the pool connections uploads take at once.
 *
 * Each row is still decided alone: it is inserted only when its run's scope columns equal its scope,
 * and the first writer of a run wins (ON CONFLICT DO NOTHING). Which uploads share a statement, and in
 * which order, is uploadGrouping.ts's rule (no two statements in flight for one run, rows by run id:
 * no deadlock). When PostgreSQL refuses a grouped statement for a row's values (then none of it was
 * written), every row is queued again to go alone, so one bad row fails only its own upload; a
 * statement aborted by a deadlock or a serialization failure (no row to blame) goes again once. Both
 * retries wait for a statement like any upload: the in-flight bound holds for them too.
 *
 * Admission: the queue holds at most `maxQueuedUploads` uploads and `maxQueuedBytes` of snapshots (one
 * upload larger than that is still admitted into an empty queue), and an upload waits at most
 * `queueTimeoutMs` for its statement. Beyond either it fails `UploadsBusy`, which the route answers 503
 * with Retry-After: under a burst, memory stays bounded and a worker hears "later" instead of waiting.
 */
import { Schema } from "effect"
import type postgres from "postgres"
import { DatabaseError } from "../db/DatabaseError.ts"
import { nextGroup } from "./uploadGrouping.ts"
import { statementFor } from "./uploadStatement.ts"

export interface UploadRow {
  readonly runId: number
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
  readonly snapshotJsonl: string
  /** UTF-8 bytes of `snapshotJsonl`. */
  readonly bytes: number
  readonly terminalStatus: string
}

/** The upload was not admitted, or waited longer than its deadline for a statement; nothing was stored. */
export class UploadsBusy extends Schema.TaggedError<UploadsBusy>()("UploadsBusy", {
  reason: Schema.Literals(["queue full", "queued too long"]),
  message: Schema.String
}) {}

/** `id` is the stored snapshot's id, or undefined when nothing was stored (out of scope, or a snapshot exists). */
export type UploadDone = (error: DatabaseError | UploadsBusy | undefined, id: string | undefined) => void

export interface UploadGroupLimits {
  /**
   * Statements running at once. 4 keeps one 4 MiB upload from holding up the small ones behind it
   * and leaves the rest of the pool to everything else.
   */
  readonly maxStatementsInFlight: number
  /** Rows per statement: 7 parameters each, far below PostgreSQL's 65,535. */
  readonly maxRowsPerStatement: number
  /** Snapshot bytes per statement; a single larger snapshot still goes, alone. */
  readonly maxBytesPerStatement: number
  /** Uploads waiting for a statement; more are refused. */
  readonly maxQueuedUploads: number
  /** Snapshot bytes waiting for a statement; more are refused (one upload alone is always admitted). */
  readonly maxQueuedBytes: number
  /** How long an upload may wait for its statement before it fails `UploadsBusy`. */
  readonly queueTimeoutMs: number
}

export const defaultUploadGroupLimits: UploadGroupLimits = {
  maxStatementsInFlight: 4,
  maxRowsPerStatement: 100,
  maxBytesPerStatement: 8 * 1024 * 1024,
  // 1,000 uploads of the measured p99 (1.3 KB) are 1.3 MB; 64 MiB caps a burst of large ones at 16
  // snapshots of the 4 MiB maximum. Statements in flight hold at most 4 x 8 MiB more.
  maxQueuedUploads: 1_000,
  maxQueuedBytes: 64 * 1024 * 1024,
  // Far below a worker's request timeout, so it hears 503 and retries instead of timing out.
  queueTimeoutMs: 10_000
}

const operation = "TranscriptSnapshots.putIfRunInScope"

/**
 * SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation, e.g. a run deleted
 * between the join and the insert) are about one row's values, so the group is retried row by row.
 */
const oneRowCanBeToBlame = (sqlState: string | undefined): boolean =>
  sqlState !== undefined && (sqlState.startsWith("22") || sqlState.startsWith("23"))

/**
 * A deadlock (40P01) or serialization failure (40001) aborts a statement that did nothing wrong (with
 * rows by run id, only another writer can be in the cycle): the same group goes again, once. Anything
 * else (a timeout, a lost connection, an overloaded server) would fail each row alone too, and
 * retrying would only multiply the load: every upload of the group gets the error.
 */
const abortedByAnotherWriter = (sqlState: string | undefined): boolean => sqlState === "40P01" || sqlState === "40001"

/** One queued upload; `withdraw` takes it back while it is still queued. */
export class QueuedUpload {
  /** Goes in a statement of its own: its group was refused for one row's values. */
  alone = false
  /** Its statement was already aborted once by another writer (see abortedByAnotherWriter). */
  retried = false
  constructor(readonly row: UploadRow, readonly done: UploadDone, readonly deadline: number) {}
}

const queueFull = new UploadsBusy({ reason: "queue full", message: "too many uploads are waiting for the database" })
const queuedTooLong = new UploadsBusy({ reason: "queued too long", message: "the upload waited too long for the database" })

export class UploadGroups {
  private queue: Array<QueuedUpload> = []
  private queuedBytes = 0
  private inFlight = 0
  /** Runs of the statements in flight: their next uploads are held back (uploadGrouping.ts). */
  private readonly runsInFlight = new Set<number>()
  private flushScheduled = false
  private deadlineTimer: ReturnType<typeof setTimeout> | undefined
  /** Statement text per row count, built once: postgres.js prepares each text once per connection. */
  private readonly statements = new Map<number, string>()
  private readonly flushNow = () => this.flush()
  private readonly expireNow = () => this.expire()

  constructor(
    private readonly sql: postgres.Sql,
    private readonly limits: UploadGroupLimits = defaultUploadGroupLimits
  ) {}

  /** Queues an upload; undefined when it is not admitted (`done` has been called with UploadsBusy). */
  submit(row: UploadRow, done: UploadDone): QueuedUpload | undefined {
    if (
      this.queue.length >= this.limits.maxQueuedUploads ||
      (this.queue.length > 0 && this.queuedBytes + row.bytes > this.limits.maxQueuedBytes)
    ) {
      done(queueFull, undefined)
      return undefined
    }
    const upload = new QueuedUpload(row, done, Date.now() + this.limits.queueTimeoutMs)
    this.enqueue(upload)
    if (this.inFlight < this.limits.maxStatementsInFlight) {
      // Uploads submitted in the same tick leave together; the flush itself waits for nothing.
      if (!this.flushScheduled) {
        this.flushScheduled = true
        queueMicrotask(this.flushNow)
      }
    } else if (this.deadlineTimer === undefined) {
      this.armDeadline()
    }
    return upload
  }

  /** Takes a queued upload back (its caller gave up); once its statement is sent, it stays sent. */
  withdraw(upload: QueuedUpload): void {
    const index = this.queue.indexOf(upload)
    if (index === -1) return
    this.queue.splice(index, 1)
    this.queuedBytes -= upload.row.bytes
  }

  /** Uploads waiting for a statement. */
  get queued(): number {
    return this.queue.length
  }

  /** Snapshot bytes waiting for a statement. */
  get queuedSnapshotBytes(): number {
    return this.queuedBytes
  }

  /** Statements running now (retries included). */
  get statementsInFlight(): number {
    return this.inFlight
  }

  private enqueue(upload: QueuedUpload): void {
    this.queue.push(upload)
    this.queuedBytes += upload.row.bytes
  }

  /** Puts uploads back at the head of the queue (they keep their deadlines). */
  private requeue(uploads: ReadonlyArray<QueuedUpload>): void {
    for (const upload of uploads) this.queuedBytes += upload.row.bytes
    this.queue = [...uploads, ...this.queue]
  }

  private flush(): void {
    this.flushScheduled = false
    while (this.queue.length > 0 && this.inFlight < this.limits.maxStatementsInFlight) {
      const { group, left } = nextGroup(this.queue, this.runsInFlight, this.limits)
      // Everything queued is held back behind a statement in flight; its end flushes again.
      if (group.length === 0) break
      this.queue = left
      for (const upload of group) this.queuedBytes -= upload.row.bytes
      this.send(group)
    }
    if (this.queue.length > 0 && this.deadlineTimer === undefined) this.armDeadline()
  }

  /** One timer for the whole queue, at its earliest deadline; unref'd, so it never keeps Node alive. */
  private armDeadline(): void {
    let earliest = Infinity
    for (const upload of this.queue) earliest = Math.min(earliest, upload.deadline)
    this.deadlineTimer = setTimeout(this.expireNow, Math.max(0, earliest - Date.now()))
    this.deadlineTimer.unref()
  }

  private expire(): void {
    this.deadlineTimer = undefined
    const now = Date.now()
    const expired = this.queue.filter((upload) => upload.deadline <= now)
    if (expired.length > 0) {
      this.queue = this.queue.filter((upload) => upload.deadline > now)
      for (const upload of expired) {
        this.queuedBytes -= upload.row.bytes
        upload.done(queuedTooLong, undefined)
      }
    }
    if (this.queue.length > 0) this.armDeadline()
  }

  private statement(rows: number): string {
    let text = this.statements.get(rows)
    if (text === undefined) {
      text = statementFor(rows)
      this.statements.set(rows, text)
    }
    return text
  }

  /**
   * The group's statement; anything postgres.js throws while building it becomes a rejection. The
   * query is returned as is, not wrapped in Promise.resolve: adopting a Promise subclass costs hops.
   */
  private execute(group: ReadonlyArray<QueuedUpload>): PromiseLike<Array<{ run_id: string; id: string }>> {
    try {
      return this.startStatement(group)
    } catch (cause) {
      return Promise.reject(cause)
    }
  }

  private startStatement(group: ReadonlyArray<QueuedUpload>) {
    const parameters: Array<string | number> = []
    for (const { row } of group) {
      parameters.push(
        row.runId,
        row.organizationId,
        row.agentId,
        row.conversationId,
        row.snapshotJsonl,
        row.bytes,
        row.terminalStatus
      )
    }
    return this.sql.unsafe<Array<{ run_id: string; id: string }>>(this.statement(group.length), parameters, {
      prepare: true
    })
  }

  private send(group: Array<QueuedUpload>): void {
    this.inFlight++
    for (const upload of group) this.runsInFlight.add(upload.row.runId)
    this.execute(group).then(
      (rows) => {
        this.finished(group)
        if (group.length === 1) return group[0]!.done(undefined, rows[0]?.id)
        const stored = new Map<string, string>()
        for (const row of rows) stored.set(row.run_id, row.id)
        for (const upload of group) upload.done(undefined, stored.get(String(upload.row.runId)))
      },
      (cause: unknown) => {
        const error = DatabaseError.fromCause(operation, cause)
        if (group.length > 1 && oneRowCanBeToBlame(error.sqlState)) {
          for (const upload of group) upload.alone = true
          this.requeue(group)
        } else if (abortedByAnotherWriter(error.sqlState) && group.every((upload) => !upload.retried)) {
          for (const upload of group) upload.retried = true
          this.requeue(group)
        } else {
          for (const upload of group) upload.done(error, undefined)
        }
        this.finished(group)
      }
    )
  }

  private finished(group: ReadonlyArray<QueuedUpload>): void {
    this.inFlight--
    for (const upload of group) this.runsInFlight.delete(upload.row.runId)
    if (this.queue.length > 0) this.flush()
  }
}
