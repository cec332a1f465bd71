/**
 * POST, GET and DELETE /worker/transcript/snapshot. The scope (organization, agent, conversation)
 * always comes from the verified token, never from the request.
 *
 * POST checks, in this order (reference section 4.3): body size (413, before the body is read),
 * JSON (400), terminal status (400), snapshot present (400), snapshot size in UTF-8 (413), storable
 * text (400), run id a positive integer (400), the token's run id equals the body's (403), the run
 * belongs to the token's scope (403), first writer wins (409). 503 with Retry-After when the upload
 * queue is full or the upload waited past its deadline.
 */
import { Effect, Option, Predicate } from "effect"
import { HttpApiBuilder } from "effect/http-api"
import { HttpServerResponse } from "effect/http"
import { RunOwnership } from "../ownership/RunOwnership.ts"
import type { TerminalStatus } from "../schema/transcriptSnapshots.ts"
import {
  checkSnapshot,
  maxSnapshotBytes,
  type PutSnapshot,
  TranscriptSnapshots,
  UploadsBusy
} from "../snapshots/TranscriptSnapshots.ts"
import { answerDatabaseFailure } from "./internalError.ts"
import { parseJson, readBodyText } from "./requestBody.ts"
import { BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, RunlaneApi, WorkerIdentity } from "./RunlaneApi.ts"

/**
 * The largest upload body read: a snapshot at its 4 MiB limit in the worst JSON escaping, plus the
 * envelope. The limit that matters is the snapshot's own, checked on the decoded text; this one only
 * refuses unread what cannot hold a valid snapshot. Worst case per UTF-8 byte: a control character
 * (1 byte) as `\u0001` is 6 bytes; `\uXXXX` (Python's json.dumps default) makes Cyrillic or Greek 3x
 * (2 bytes → 6), CJK 2x (3 → 6) and astral characters 3x (4 → 12, a surrogate pair). So 6x admits
 * every valid snapshot; 2x refused a 3 MiB Cyrillic transcript.
 */
export const maxUploadBodyBytes = 6 * maxSnapshotBytes + 64 * 1024

const outOfScope = new Forbidden({ error: "runId out of scope" })

/**
 * Seconds a worker is told to wait when the upload queue is full or an upload waited past its
 * deadline (503): at the measured rates a full queue of small uploads drains well within it.
 */
export const uploadRetryAfterSeconds = 1

const busy = (error: UploadsBusy) =>
  HttpServerResponse.jsonUnsafe({ error: `Busy: ${error.message}; retry later` }, {
    status: 503,
    headers: { "retry-after": String(uploadRetryAfterSeconds) }
  })

const fieldErrors: Record<string, string> = {
  terminalStatus: "Invalid terminalStatus",
  snapshotJsonl: "Missing snapshotJsonl",
  runId: "Missing or invalid runId"
}

// The size and fields are checked before these calls; `put` still refuses a run deleted in between
// (InvalidSnapshot on runId), which is out of scope by then.
const refusalsAfterChecks = {
  SnapshotTooLarge: () => Effect.fail(new PayloadTooLarge({ error: "Snapshot too large" })),
  InvalidSnapshot: () => Effect.fail(outOfScope)
} as const

export const SnapshotHandlers = HttpApiBuilder.group(
  RunlaneApi,
  "snapshots",
  Effect.fnUntraced(function*(handlers) {
    const snapshots = yield* TranscriptSnapshots
    const ownership = yield* RunOwnership

    return handlers
      .handleRaw("upload", ({ request }) =>
        Effect.gen(function*() {
          const identity = yield* WorkerIdentity
          const body = yield* Effect.flatMap(readBodyText(request, maxUploadBodyBytes), parseJson)
          if (!Predicate.isObject(body) || Array.isArray(body)) {
            return yield* new BadRequest({ error: "The body must be a JSON object" })
          }
          // Unchecked until checkSnapshot below, which tests every field's type.
          const upload = body as Record<string, unknown>
          const input: PutSnapshot = {
            runId: upload["runId"] as number,
            terminalStatus: upload["terminalStatus"] as TerminalStatus,
            snapshotJsonl: upload["snapshotJsonl"] as string
          }
          // Checked once: the services below trust the checked snapshot rather than scan it again.
          const snapshot = checkSnapshot(input)
          if (snapshot._tag === "SnapshotTooLarge") {
            return yield* new PayloadTooLarge({ error: "Snapshot too large", field: "snapshotJsonl" })
          }
          if (snapshot._tag === "InvalidSnapshot") {
            // A present snapshot can still be refused for its content; say why rather than "missing".
            const unstorable = snapshot.field === "snapshotJsonl" && Predicate.isString(input.snapshotJsonl) &&
              input.snapshotJsonl !== ""
            const message = unstorable ? snapshot.message : fieldErrors[snapshot.field] ?? snapshot.message
            return yield* new BadRequest({ error: message, field: snapshot.field })
          }
          if (identity.kind !== "run" || identity.runId !== input.runId) return yield* outOfScope
          const stored = yield* snapshots.putIfRunInScope(identity.scope, snapshot).pipe(
            Effect.catchTags({ ...refusalsAfterChecks, UploadsBusy: (error) => Effect.succeed(error) })
          )
          if (stored instanceof UploadsBusy) return busy(stored)
          if (Option.isSome(stored)) return stored.value
          // Not stored in one statement: the run is another scope's, a legacy row without scope columns,
          // or it already has a snapshot. RunOwnership tells the first two apart.
          if (!(yield* ownership.verify(input.runId, identity.scope))) return yield* outOfScope
          return yield* snapshots.put(identity.scope, snapshot).pipe(
            Effect.catchTags({
              ...refusalsAfterChecks,
              SnapshotExists: () => Effect.fail(new Conflict({ error: "Snapshot already exists for run" }))
            })
          )
        }).pipe(answerDatabaseFailure))
      .handle("latest", () =>
        Effect.gen(function*() {
          const identity = yield* WorkerIdentity
          const latest = yield* snapshots.latest(identity.scope)
          if (Option.isNone(latest)) return yield* new NotFound({ error: "No snapshot found" })
          return HttpServerResponse.text(latest.value, { contentType: "application/x-ndjson; charset=utf-8" })
        }).pipe(answerDatabaseFailure))
      .handle("reset", () =>
        Effect.flatMap(WorkerIdentity, (identity) => snapshots.reset(identity.scope)).pipe(
          answerDatabaseFailure
        ))
  })
)
