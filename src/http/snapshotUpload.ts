/**
 * POST /worker/transcript/snapshot, the upload: the hot route of the service (one per run), served as
 * a plain HttpRouter route rather than through HttpApiBuilder. RunlaneApi still declares it, so
 * /openapi.json documents it, but HttpApiBuilder serves `ServedApi`, which leaves it out: no handler
 * of it exists there to be served instead. Every answer (status, headers, body) is the one the
 * http-api endpoint gave (test/http/uploadAnswers.http.test.ts); what the endpoint's machinery did
 * per request (the security middleware, the handler wrapping, the error and success encoding through
 * schemas) is done here directly. Measured with 1 KB uploads, 16 in flight, on a 2-core machine shared
 * with other work: the CPU spent in effect, @effect/platform-node and runlane's own code went from
 * about 240 to 70 µs per upload (CPU profile of 10,000 uploads), and `npm run bench -- --only=http`
 * put the upload at a median 0.87 of the hand-written grouped upload, against 0.71 before.
 *
 * Checks, in this order (reference section 4.3): the bearer worker token (401, or 400 without a scope
 * claim), body size (413, before the body is read), JSON (400), terminal status (400), snapshot
 * present (400), snapshot size in UTF-8 (413), storable text (400), run id a positive integer (400),
 * the token's run id equals the body's (403), the run belongs to the token's scope (403), first
 * writer wins (409). 503 with Retry-After when the upload queue is full or the upload waited past its
 * deadline, or when the bodies being read at once would pass their bound (uploadBodies.ts, before
 * this body is read). The scope always comes from the verified token, never from the request.
 */
import { Effect, Option, Predicate } from "effect"
import { HttpRouter, HttpServerResponse } from "effect/http"
import type { HttpServerRequest } from "effect/http/HttpServerRequest"
import { RunOwnership } from "../ownership/RunOwnership.ts"
import { type VerifiedToken, WorkerTokens } from "../ownership/WorkerTokens.ts"
import type { TerminalStatus } from "../schema/transcriptSnapshots.ts"
import {
  type CheckedSnapshot,
  checkSnapshot,
  maxSnapshotBytes,
  TranscriptSnapshots,
  type UploadsBusy
} from "../snapshots/TranscriptSnapshots.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"
import { internalError, logDatabaseFailure } from "./internalError.ts"
import { parseJson, readBodyTextWithin } from "./requestBody.ts"
import { makeUploadBodies, uploadBodiesMaxBytes, UploadBodiesBusy } from "./uploadBodies.ts"
import { BadRequest, Conflict, Forbidden, InternalError, PayloadTooLarge, Unauthorized } from "./RunlaneApi.ts"

/**
 * The largest upload body read: a snapshot at its 4 MiB limit in the worst JSON escaping, plus the
 * envelope. The limit that matters is the snapshot's own, checked on the decoded text; this one only
 * refuses unread what cannot hold a valid snapshot. Worst case per UTF-8 byte: a control character
 * (1 byte) as `\u0001` is 6 bytes; `\uXXXX` (Python's json.dumps default) makes Cyrillic or Greek 3x
 * (2 bytes → 6), CJK 2x (3 → 6) and astral characters 3x (4 → 12, a surrogate pair). So 6x admits
 * every valid snapshot; 2x refused a 3 MiB Cyrillic transcript.
 */
export const maxUploadBodyBytes = 6 * maxSnapshotBytes + 64 * 1024

/**
 * Seconds a worker is told to wait when the upload queue is full or an upload waited past its
 * deadline (503): at the measured rates a full queue of small uploads drains well within it.
 */
export const uploadRetryAfterSeconds = 1

const uploadPath = "/worker/transcript/snapshot"

/** What the route refuses with: RunlaneApi's errors, whose bodies are `{ error, field? }`. */
type Refusal = Unauthorized | BadRequest | Forbidden | Conflict | PayloadTooLarge | InternalError

/** The status RunlaneApi declares for each error (its `httpApiStatus`). */
const statusOf = (refusal: Refusal): number =>
  refusal instanceof Unauthorized
    ? 401
    : refusal instanceof BadRequest
    ? 400
    : refusal instanceof Forbidden
    ? 403
    : refusal instanceof Conflict
    ? 409
    : refusal instanceof PayloadTooLarge
    ? 413
    : 500

/** The error as the http-api endpoint encoded it: JSON, `field` only when set. */
const refuse = (refusal: Refusal): Effect.Effect<HttpServerResponse.HttpServerResponse> =>
  Effect.succeed(HttpServerResponse.jsonUnsafe(
    refusal.field === undefined ? { error: refusal.error } : { error: refusal.error, field: refusal.field },
    { status: statusOf(refusal) }
  ))

const invalidToken = new Unauthorized({ error: "Invalid token" })
const missingScope = new BadRequest({ error: "Token missing required scope" })
const notAnObject = new BadRequest({ error: "The body must be a JSON object" })
const outOfScope = new Forbidden({ error: "runId out of scope" })
const snapshotTooLarge = new PayloadTooLarge({ error: "Snapshot too large" })
const snapshotExists = new Conflict({ error: "Snapshot already exists for run" })

const busy = (error: UploadsBusy | UploadBodiesBusy) =>
  Effect.succeed(HttpServerResponse.jsonUnsafe({ error: `Busy: ${error.message}; retry later` }, {
    status: 503,
    headers: { "retry-after": String(uploadRetryAfterSeconds) }
  }))

const fieldErrors: Record<string, string> = {
  terminalStatus: "Invalid terminalStatus",
  snapshotJsonl: "Missing snapshotJsonl",
  runId: "Missing or invalid runId"
}

/** A database failure: logged, answered 500 with a generic body (internalError.ts). */
const databaseFailure = (error: DatabaseError) => Effect.andThen(logDatabaseFailure(error), refuse(internalError))

const stored = (row: { readonly id: number }) => Effect.succeed(HttpServerResponse.jsonUnsafe({ id: row.id }))

/**
 * The credential of an `Authorization: Bearer …` header, read as HttpApiSecurity.bearer reads it
 * (HttpApiBuilder's getAuthorizationCredential, which effect does not export): the scheme in any case,
 * then one or more spaces. Undefined without one.
 */
const bearerCredential = (authorization: string | undefined): string | undefined => {
  const scheme = "bearer"
  if (
    authorization === undefined ||
    authorization.length <= scheme.length ||
    authorization.charCodeAt(scheme.length) !== 32 ||
    authorization.slice(0, scheme.length).toLowerCase() !== scheme
  ) {
    return undefined
  }
  let start = scheme.length + 1
  while (authorization.charCodeAt(start) === 32) start++
  return start === authorization.length ? undefined : authorization.slice(start)
}

/** The route, over the services it stands on. */
export const SnapshotUploadRoute = HttpRouter.use(Effect.fnUntraced(function*(router) {
  const tokens = yield* WorkerTokens
  const snapshots = yield* TranscriptSnapshots
  const ownership = yield* RunOwnership
  const bodies = makeUploadBodies(yield* uploadBodiesMaxBytes)

  // Not stored in one statement: the run is another scope's, a legacy row without scope columns, or
  // it already has a snapshot. RunOwnership tells the first two apart. `put` still refuses a run
  // deleted in between (InvalidSnapshot on runId), which is out of scope by then.
  const storeOwned = (identity: VerifiedToken, snapshot: CheckedSnapshot, runId: number) =>
    Effect.matchEffect(ownership.verify(runId, identity.scope), {
      onFailure: databaseFailure,
      onSuccess: (owned) =>
        owned
          ? Effect.matchEffect(snapshots.put(identity.scope, snapshot), {
            onFailure: (error) =>
              error._tag === "SnapshotExists"
                ? refuse(snapshotExists)
                : error._tag === "SnapshotTooLarge"
                ? refuse(snapshotTooLarge)
                : error._tag === "InvalidSnapshot"
                ? refuse(outOfScope)
                : databaseFailure(error),
            onSuccess: stored
          })
          : refuse(outOfScope)
    })

  // The hot path: one statement shared with concurrent uploads. The size and fields were checked
  // before, so SnapshotTooLarge and InvalidSnapshot cannot happen here but are answered as `put`'s.
  const store = (identity: VerifiedToken, snapshot: CheckedSnapshot, runId: number) =>
    Effect.matchEffect(snapshots.putIfRunInScope(identity.scope, snapshot), {
      onFailure: (error) =>
        error._tag === "UploadsBusy"
          ? busy(error)
          : error._tag === "SnapshotTooLarge"
          ? refuse(snapshotTooLarge)
          : error._tag === "InvalidSnapshot"
          ? refuse(outOfScope)
          : databaseFailure(error),
      onSuccess: (row) => Option.isSome(row) ? stored(row.value) : storeOwned(identity, snapshot, runId)
    })

  const uploadChecked = (identity: VerifiedToken, body: unknown) => {
    if (!Predicate.isObject(body) || Array.isArray(body)) return refuse(notAnObject)
    // Unchecked until checkSnapshot below, which tests every field's type.
    const upload = body as Record<string, unknown>
    const input = {
      runId: upload["runId"] as number,
      terminalStatus: upload["terminalStatus"] as TerminalStatus,
      snapshotJsonl: upload["snapshotJsonl"] as string
    }
    // Checked once: the services below trust the checked snapshot rather than scan it again.
    const snapshot = checkSnapshot(input)
    if (snapshot._tag === "SnapshotTooLarge") {
      return refuse(new PayloadTooLarge({ error: "Snapshot too large", field: "snapshotJsonl" }))
    }
    if (snapshot._tag === "InvalidSnapshot") {
      // A present snapshot can still be refused for its content; say why rather than "missing".
      const unstorable = snapshot.field === "snapshotJsonl" && Predicate.isString(input.snapshotJsonl) &&
        input.snapshotJsonl !== ""
      const message = unstorable ? snapshot.message : fieldErrors[snapshot.field] ?? snapshot.message
      return refuse(new BadRequest({ error: message, field: snapshot.field }))
    }
    if (identity.kind !== "run" || identity.runId !== input.runId) return refuse(outOfScope)
    return store(identity, snapshot, input.runId)
  }

  const upload = (request: HttpServerRequest) => {
    const credential = bearerCredential(request.headers.authorization)
    if (credential === undefined) return refuse(invalidToken)
    return Effect.matchEffect(tokens.verify(credential), {
      onFailure: (error) => refuse(error.reason === "scope" ? missingScope : invalidToken),
      onSuccess: (identity) =>
        // This upload's share of the bodies being read (uploadBodies.ts), until its answer is ready;
        // its release is in place before a byte is taken.
        Effect.acquireUseRelease(
          Effect.sync(bodies.open),
          (body) =>
            Effect.matchEffect(
              Effect.flatMap(readBodyTextWithin(request, maxUploadBodyBytes, { body, busy: bodies.busy }), parseJson),
              {
                onFailure: (error) => error instanceof UploadBodiesBusy ? busy(error) : refuse(error),
                onSuccess: (parsed) => uploadChecked(identity, parsed)
              }
            ),
          (body) => Effect.sync(body.release)
        )
    })
  }

  yield* router.add("POST", uploadPath, upload)
}))
