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
 * and the first writer of a run wins (ON CONFLICT DO NOTHING). Two uploads for one run never share a
 * statement, so each row of the answer belongs to exactly one waiting upload. When PostgreSQL refuses a
 * grouped statement for a row's values (then none of it was written), every row is tried again alone,
 * so one bad row fails only its own upload.
 */
import type postgres from "postgres"
import { DatabaseError } from "../db/DatabaseError.ts"

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

/** `id` is the stored snapshot's id, or undefined when nothing was stored (out of scope, or a snapshot exists). */
export type UploadDone = (error: DatabaseError | undefined, id: string | undefined) => void

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
}

export const defaultUploadGroupLimits: UploadGroupLimits = {
  maxStatementsInFlight: 4,
  maxRowsPerStatement: 100,
  maxBytesPerStatement: 8 * 1024 * 1024
}

const operation = "TranscriptSnapshots.putIfRunInScope"

/**
 * SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation, e.g. a run deleted
 * between the join and the insert) are about one row's values, so the group is retried row by row.
 * Anything else (a timeout, a lost connection, an overloaded server) would fail each row alone too,
 * and retrying them one by one would only multiply the load: every upload of the group gets the error.
 */
const oneRowCanBeToBlame = (sqlState: string | undefined): boolean =>
  sqlState !== undefined && (sqlState.startsWith("22") || sqlState.startsWith("23"))

const columnsPerRow = 7

/** One queued upload; `withdraw` takes it back while it is still queued. */
export class QueuedUpload {
  constructor(readonly row: UploadRow, readonly done: UploadDone) {}
}

const statementFor = (rows: number): string => {
  const values: Array<string> = []
  for (let row = 0; row < rows; row++) {
    const first = row * columnsPerRow
    const [runId, organization, agent, conversation, snapshot, bytes, status] = Array.from(
      { length: columnsPerRow },
      (_, column) => `$${first + column + 1}`
    )
    values.push(`(${runId}::bigint, ${organization}::text, ${agent}::text, ${conversation}::text, ${snapshot}::text, ${bytes}::integer, ${status}::text)`)
  }
  return `insert into agent_transcript_snapshots
  (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
select r.organization_id, r.agent_id, r.conversation_id, r.id, u.snapshot_jsonl, u.byte_size, u.terminal_status
  from (values ${values.join(", ")})
    as u (run_id, organization_id, agent_id, conversation_id, snapshot_jsonl, byte_size, terminal_status)
  join runs r on r.id = u.run_id and r.organization_id = u.organization_id
             and r.agent_id = u.agent_id and r.conversation_id = u.conversation_id
on conflict (organization_id, agent_id, conversation_id, run_id) do nothing
returning run_id::text, id::text`
}

export class UploadGroups {
  private queue: Array<QueuedUpload> = []
  private inFlight = 0
  private flushScheduled = false
  /** Statement text per row count, built once: postgres.js prepares each text once per connection. */
  private readonly statements = new Map<number, string>()
  private readonly flushNow = () => this.flush()

  constructor(
    private readonly sql: postgres.Sql,
    private readonly limits: UploadGroupLimits = defaultUploadGroupLimits
  ) {}

  submit(row: UploadRow, done: UploadDone): QueuedUpload {
    const upload = new QueuedUpload(row, done)
    this.queue.push(upload)
    // Uploads submitted in the same tick leave together; the flush itself waits for nothing.
    if (!this.flushScheduled && this.inFlight < this.limits.maxStatementsInFlight) {
      this.flushScheduled = true
      queueMicrotask(this.flushNow)
    }
    return upload
  }

  /** Takes a queued upload back (its caller gave up); once its statement is sent, it stays sent. */
  withdraw(upload: QueuedUpload): void {
    const index = this.queue.indexOf(upload)
    if (index !== -1) this.queue.splice(index, 1)
  }

  /** Uploads waiting for a statement (the tests read it). */
  get queued(): number {
    return this.queue.length
  }

  private flush(): void {
    this.flushScheduled = false
    while (this.queue.length > 0 && this.inFlight < this.limits.maxStatementsInFlight) {
      this.send(this.nextGroup())
    }
  }

  /** The next statement's uploads, in arrival order, at most one per run. */
  private nextGroup(): Array<QueuedUpload> {
    const group: Array<QueuedUpload> = []
    const left: Array<QueuedUpload> = []
    const runs = new Set<number>()
    let bytes = 0
    for (const upload of this.queue) {
      const fits = group.length === 0 ||
        (group.length < this.limits.maxRowsPerStatement && bytes + upload.row.bytes <= this.limits.maxBytesPerStatement)
      if (fits && !runs.has(upload.row.runId)) {
        group.push(upload)
        runs.add(upload.row.runId)
        bytes += upload.row.bytes
      } else {
        left.push(upload)
      }
    }
    this.queue = left
    return group
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
    this.execute(group).then(
      (rows) => {
        this.finished()
        if (group.length === 1) return group[0]!.done(undefined, rows[0]?.id)
        const stored = new Map<string, string>()
        for (const row of rows) stored.set(row.run_id, row.id)
        for (const upload of group) upload.done(undefined, stored.get(String(upload.row.runId)))
      },
      (cause: unknown) => {
        this.finished()
        const error = DatabaseError.fromCause(operation, cause)
        if (group.length > 1 && oneRowCanBeToBlame(error.sqlState)) {
          for (const upload of group) this.sendAlone(upload)
        } else {
          for (const upload of group) upload.done(error, undefined)
        }
      }
    )
  }

  /** After a refused group: this row in its own statement, outside the in-flight bound (a rare path). */
  private sendAlone(upload: QueuedUpload): void {
    this.execute([upload]).then(
      (rows) => upload.done(undefined, rows[0]?.id),
      (cause: unknown) => upload.done(DatabaseError.fromCause(operation, cause), undefined)
    )
  }

  private finished(): void {
    this.inFlight--
    if (this.queue.length > 0) this.flush()
  }
}
