/**
 * TranscriptSnapshots: a worker's session transcript (JSONL), stored once per run and read back to
 * hydrate the next worker of the conversation.
 *
 * First writer wins: a second write for the same run is SnapshotExists (the reference answered 409 and
 * workers treat it as benign). `latest` serves only `completed` snapshots, so a failed run's dangling
 * tool call is never replayed. The scope always comes from the caller (a verified token), never from the
 * body. Whether the caller owns the run is RunOwnership's question, asked before `put`.
 */
import { Config, Context, Effect, Layer, Option, Schema } from "effect"
import { Database } from "../db/Database.ts"
import { DatabaseError } from "../db/DatabaseError.ts"
import { terminalStatuses, type TerminalStatus } from "../schema/transcriptSnapshots.ts"
import { defaultUploadGroupLimits, type UploadGroupLimits, UploadGroups, type UploadRow, UploadsBusy } from "./uploadGroups.ts"

export { defaultUploadGroupLimits, type UploadGroupLimits, UploadsBusy }

/** 4 MiB of UTF-8; measured payloads: p99 about 1.3 KB, largest 633 KB (reference section 1.2). */
export const maxSnapshotBytes = 4 * 1024 * 1024

export class SnapshotExists extends Schema.TaggedError<SnapshotExists>()("SnapshotExists", {
  runId: Schema.Number
}) {}

export class SnapshotTooLarge extends Schema.TaggedError<SnapshotTooLarge>()("SnapshotTooLarge", {
  bytes: Schema.Number,
  limit: Schema.Number
}) {}

export class InvalidSnapshot extends Schema.TaggedError<InvalidSnapshot>()("InvalidSnapshot", {
  field: Schema.String,
  message: Schema.String
}) {}

export class UploadQueueConfigError extends Schema.TaggedError<UploadQueueConfigError>()("UploadQueueConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}

/** The upload queue's state (for /metrics). */
export interface UploadQueueUsage {
  readonly queued: number
  readonly queuedBytes: number
  readonly statementsInFlight: number
}

export interface SnapshotScope {
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
}

export interface PutSnapshot {
  readonly runId: number
  readonly terminalStatus: TerminalStatus
  readonly snapshotJsonl: string
}

/**
 * A snapshot that passed `checkSnapshot`, with its UTF-8 size. Only `checkSnapshot` makes one (the
 * class itself is not exported), so `put` and `putIfRunInScope` trust it instead of scanning up to
 * 4 MiB again: a caller that must check before other steps (the upload route) checks once.
 */
class CheckedSnapshot {
  readonly _tag = "CheckedSnapshot"
  constructor(readonly input: PutSnapshot, readonly bytes: number) {}
}
export type { CheckedSnapshot }

/** Pure: a checked snapshot, or what is wrong with it. The size is checked first and cheaply. */
export const checkSnapshot = (input: PutSnapshot): CheckedSnapshot | SnapshotTooLarge | InvalidSnapshot => {
  if (!(terminalStatuses as ReadonlyArray<unknown>).includes(input.terminalStatus)) {
    return new InvalidSnapshot({ field: "terminalStatus", message: `must be one of ${terminalStatuses.join(", ")}` })
  }
  if (typeof input.snapshotJsonl !== "string" || input.snapshotJsonl.length === 0) {
    return new InvalidSnapshot({ field: "snapshotJsonl", message: "must be a non-empty string" })
  }
  const bytes = Buffer.byteLength(input.snapshotJsonl, "utf8")
  if (bytes > maxSnapshotBytes) return new SnapshotTooLarge({ bytes, limit: maxSnapshotBytes })
  // PostgreSQL text holds neither U+0000 nor a lone surrogate (which has no UTF-8 form). Two native
  // scans instead of the regular expression with lookarounds used before (Node 20, this machine):
  // 0.04 µs against 0.38 µs for 1 KB, 4.8 µs against 228 µs for 600 KB of ASCII, 254 µs against
  // 888 µs for 600 KB of mixed scripts and emoji.
  if (input.snapshotJsonl.includes("\u0000") || !input.snapshotJsonl.isWellFormed()) {
    return new InvalidSnapshot({
      field: "snapshotJsonl",
      message: "contains U+0000 or a lone UTF-16 surrogate, which PostgreSQL text cannot store"
    })
  }
  if (!Number.isSafeInteger(input.runId) || input.runId <= 0) {
    return new InvalidSnapshot({ field: "runId", message: "must be a positive integer" })
  }
  return new CheckedSnapshot(input, bytes)
}

const checked = (input: PutSnapshot | CheckedSnapshot) =>
  input instanceof CheckedSnapshot ? input : checkSnapshot(input)

export class TranscriptSnapshots extends Context.Service<TranscriptSnapshots, {
  readonly put: (
    scope: SnapshotScope,
    input: PutSnapshot | CheckedSnapshot
  ) => Effect.Effect<{ readonly id: number }, SnapshotExists | SnapshotTooLarge | InvalidSnapshot | DatabaseError>
  /**
   * `put` in one statement, only when the run's organization, agent and conversation columns equal the
   * scope. None when they do not (or the run has no such columns: ask RunOwnership, which knows legacy
   * rows) or when the run already has a snapshot. This is the upload's hot path: one round trip, in
   * a statement shared with concurrent uploads (uploadGroups.ts); interrupted while it still waits
   * for a statement, the upload is withdrawn and never stored. `UploadsBusy` when the queue is full
   * or the upload waited longer than its deadline: nothing was stored, try again later.
   */
  readonly putIfRunInScope: (
    scope: SnapshotScope,
    input: PutSnapshot | CheckedSnapshot
  ) => Effect.Effect<
    Option.Option<{ readonly id: number }>,
    SnapshotTooLarge | InvalidSnapshot | UploadsBusy | DatabaseError
  >
  /** Uploads waiting for a statement, their bytes, and the statements running. */
  readonly uploadQueue: Effect.Effect<UploadQueueUsage>
  /** The newest `completed` snapshot of the conversation, byte for byte. */
  readonly latest: (scope: SnapshotScope) => Effect.Effect<Option.Option<string>, DatabaseError>
  /** Deletes every snapshot of the conversation (a session reset); answers how many. */
  readonly reset: (scope: SnapshotScope) => Effect.Effect<{ readonly deleted: number }, DatabaseError>
}>()("runlane/TranscriptSnapshots") {
  /** With the upload queue's bounds given (the rest from `defaultUploadGroupLimits`). */
  static readonly layerWith = (limits: Partial<UploadGroupLimits>) =>
    Layer.effect(TranscriptSnapshots, Effect.flatMap(Database, (database) => make(database, limits)))

  /**
   * Configured from the environment: RUNLANE_UPLOAD_QUEUE_MAX, RUNLANE_UPLOAD_QUEUE_MAX_BYTES and
   * RUNLANE_UPLOAD_QUEUE_TIMEOUT_MS, each a positive whole number (defaults in `defaultUploadGroupLimits`).
   */
  static readonly layer = Layer.effect(
    TranscriptSnapshots,
    Effect.gen(function*() {
      const database = yield* Database
      return yield* make(database, {
        maxQueuedUploads: yield* positiveInteger("RUNLANE_UPLOAD_QUEUE_MAX", defaultUploadGroupLimits.maxQueuedUploads),
        maxQueuedBytes: yield* positiveInteger("RUNLANE_UPLOAD_QUEUE_MAX_BYTES", defaultUploadGroupLimits.maxQueuedBytes),
        queueTimeoutMs: yield* positiveInteger("RUNLANE_UPLOAD_QUEUE_TIMEOUT_MS", defaultUploadGroupLimits.queueTimeoutMs)
      })
    })
  )
}

const positiveInteger = Effect.fnUntraced(function*(variable: string, fallback: number) {
  const value = yield* Config.Int(variable).pipe(
    Config.withDefault(fallback),
    Effect.mapError((error) => new UploadQueueConfigError({ variable, message: `${variable}: ${error.message}` }))
  )
  if (Number.isSafeInteger(value) && value > 0) return value
  return yield* new UploadQueueConfigError({ variable, message: `${variable}=${value} must be a positive whole number` })
})

const make = Effect.fnUntraced(function*(database: Database["Service"], limits: Partial<UploadGroupLimits>) {
  const put = Effect.fn("TranscriptSnapshots.put")(function*(scope: SnapshotScope, given: PutSnapshot | CheckedSnapshot) {
    const snapshot = checked(given)
    if (!(snapshot instanceof CheckedSnapshot)) return yield* snapshot
    const { input, bytes } = snapshot
    const rows = yield* database.use("TranscriptSnapshots.put", (sql) =>
      sql<Array<{ id: string }>>`
        insert into agent_transcript_snapshots
          (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
        values (${scope.organizationId}, ${scope.agentId}, ${scope.conversationId}, ${input.runId},
                ${input.snapshotJsonl}, ${bytes}, ${input.terminalStatus})
        on conflict (organization_id, agent_id, conversation_id, run_id) do nothing
        returning id::text`).pipe(
      Effect.catchIf(
        (error) => error.sqlState === "23503",
        () => Effect.fail(new InvalidSnapshot({ field: "runId", message: "no such run" }))
      )
    )
    const row = rows[0]
    if (row === undefined) return yield* new SnapshotExists({ runId: input.runId })
    return { id: Number(row.id) }
  })

  // Concurrent uploads share statements (see uploadGroups.ts). Untraced like RunOwnership.verify:
  // this is the upload's hot path (npm run bench).
  const groups = new UploadGroups(database.sql, { ...defaultUploadGroupLimits, ...limits })
  const putIfRunInScope = (scope: SnapshotScope, given: PutSnapshot | CheckedSnapshot) => {
    const snapshot = checked(given)
    if (!(snapshot instanceof CheckedSnapshot)) return Effect.fail(snapshot)
    const row: UploadRow = {
      runId: snapshot.input.runId,
      organizationId: scope.organizationId,
      agentId: scope.agentId,
      conversationId: scope.conversationId,
      snapshotJsonl: snapshot.input.snapshotJsonl,
      bytes: snapshot.bytes,
      terminalStatus: snapshot.input.terminalStatus
    }
    return Effect.callback<Option.Option<{ readonly id: number }>, DatabaseError | UploadsBusy>((resume) => {
      const queued = groups.submit(row, (error, id) =>
        resume(
          error !== undefined
            ? Effect.fail(error)
            : Effect.succeed(id === undefined ? Option.none() : Option.some({ id: Number(id) }))
        ))
      // Not admitted: already answered, nothing to withdraw.
      if (queued !== undefined) return Effect.sync(() => groups.withdraw(queued))
    })
  }

  const uploadQueue = Effect.sync((): UploadQueueUsage => ({
    queued: groups.queued,
    queuedBytes: groups.queuedSnapshotBytes,
    statementsInFlight: groups.statementsInFlight
  }))

  const latest = Effect.fn("TranscriptSnapshots.latest")(function*(scope: SnapshotScope) {
    const rows = yield* database.use("TranscriptSnapshots.latest", (sql) =>
      sql<Array<{ snapshot_jsonl: string }>>`
        select snapshot_jsonl from agent_transcript_snapshots
         where organization_id = ${scope.organizationId} and agent_id = ${scope.agentId}
           and conversation_id = ${scope.conversationId} and terminal_status = 'completed'
         order by run_id desc
         limit 1`)
    return Option.fromNullishOr(rows[0]?.snapshot_jsonl)
  })

  const reset = Effect.fn("TranscriptSnapshots.reset")(function*(scope: SnapshotScope) {
    const rows = yield* database.use("TranscriptSnapshots.reset", (sql) =>
      sql`
        delete from agent_transcript_snapshots
         where organization_id = ${scope.organizationId} and agent_id = ${scope.agentId}
           and conversation_id = ${scope.conversationId}`)
    return { deleted: rows.count }
  })

  return TranscriptSnapshots.of({ put, putIfRunInScope, uploadQueue, latest, reset })
})
