/**
 * The runlane HTTP contract (effect/http-api): routes, payloads, answers and error bodies. Handlers
 * live beside it (`*Handlers.ts`); this file has no server code, so a client can be generated from it.
 *
 * Every error answers JSON `{ "error": "<what went wrong>" }`, plus `field` when one input field is
 * to blame. Status codes follow the reference system (section 4.3).
 */
import { Context, Schema } from "effect"
import { HttpApi, HttpApiEndpoint, HttpApiGroup, HttpApiMiddleware, HttpApiSchema, HttpApiSecurity, OpenApi } from "effect/http-api"
import { terminalStatuses } from "../schema/transcriptSnapshots.ts"
import type { VerifiedToken } from "../ownership/WorkerTokens.ts"

const errorFields = { error: Schema.String, field: Schema.optional(Schema.String) }

export class BadRequest extends Schema.Error<BadRequest>("runlane/BadRequest")(errorFields, { httpApiStatus: 400 }) {}
export class Unauthorized extends Schema.Error<Unauthorized>("runlane/Unauthorized")(errorFields, { httpApiStatus: 401 }) {}
export class Forbidden extends Schema.Error<Forbidden>("runlane/Forbidden")(errorFields, { httpApiStatus: 403 }) {}
export class NotFound extends Schema.Error<NotFound>("runlane/NotFound")(errorFields, { httpApiStatus: 404 }) {}
export class Conflict extends Schema.Error<Conflict>("runlane/Conflict")(errorFields, { httpApiStatus: 409 }) {}
export class PayloadTooLarge extends Schema.Error<PayloadTooLarge>("runlane/PayloadTooLarge")(errorFields, {
  httpApiStatus: 413
}) {}
export class InternalError extends Schema.Error<InternalError>("runlane/InternalError")(errorFields, {
  httpApiStatus: 500
}) {}
export class Unavailable extends Schema.Error<Unavailable>("runlane/Unavailable")(errorFields, { httpApiStatus: 503 }) {}

/** The verified token of the worker calling, provided by `WorkerAuth`. */
export class WorkerIdentity extends Context.Service<WorkerIdentity, VerifiedToken>()("runlane/http/WorkerIdentity") {}

/** Bearer worker token (run or deployment): 401 when it does not verify, 400 when it lacks a scope claim. */
export class WorkerAuth extends HttpApiMiddleware.Service<WorkerAuth, { provides: WorkerIdentity }>()(
  "runlane/http/WorkerAuth",
  { security: { bearer: HttpApiSecurity.bearer }, error: [Unauthorized, BadRequest] }
) {}

/** Bearer `RUNLANE_ADMIN_TOKEN`; every admin route answers 404 when that variable is not set. */
export class AdminAuth extends HttpApiMiddleware.Service<AdminAuth>()(
  "runlane/http/AdminAuth",
  { security: { bearer: HttpApiSecurity.bearer }, error: [Unauthorized, NotFound] }
) {}

export const SnapshotUpload = Schema.Struct({
  runId: Schema.Number,
  terminalStatus: Schema.Literals(terminalStatuses),
  snapshotJsonl: Schema.String
})

export const SnapshotJsonl = Schema.String.pipe(HttpApiSchema.asText({ contentType: "application/x-ndjson" }))

// The body is read by the handler itself, under a byte limit, so an oversized upload is refused
// before it is read; the payload schema documents it.
const uploadEndpoint = HttpApiEndpoint.post("upload", "/snapshot", {
  payload: SnapshotUpload,
  success: Schema.Struct({ id: Schema.Number }),
  error: [BadRequest, Forbidden, Conflict, PayloadTooLarge, InternalError, Unavailable]
})
const latestEndpoint = HttpApiEndpoint.get("latest", "/snapshot", {
  success: SnapshotJsonl,
  error: [NotFound, InternalError]
})
const resetEndpoint = HttpApiEndpoint.delete("reset", "/snapshot", {
  success: Schema.Struct({ deleted: Schema.Number }),
  error: InternalError
})

const snapshotsGroup = <const Endpoints extends readonly [HttpApiEndpoint.Constraint, ...Array<HttpApiEndpoint.Constraint>]>(
  ...endpoints: Endpoints
) =>
  HttpApiGroup.make("snapshots")
    .add(...endpoints)
    .middleware(WorkerAuth)
    .prefix("/worker/transcript")
    .annotateMerge(OpenApi.annotations({ title: "Transcript snapshots", description: "A worker's session transcript" }))

export class SnapshotsGroup extends snapshotsGroup(uploadEndpoint, latestEndpoint, resetEndpoint) {}

/**
 * The snapshots group as HttpApiBuilder serves it: without the upload, which is a plain router route
 * (snapshotUpload.ts) answering exactly as this contract says, with less work per request.
 */
export class ServedSnapshotsGroup extends snapshotsGroup(latestEndpoint, resetEndpoint) {}

export const OrchestratorHealth = Schema.Struct({
  status: Schema.Literal("ok"),
  reserved_conversation_locks: Schema.Number,
  reserved_conversation_locks_cap: Schema.Number,
  near_cap: Schema.Boolean,
  held: Schema.Number,
  in_flight: Schema.Number,
  /** Sessions that may still hold a lock, whose terminate is being retried; they count against the cap. */
  stranded: Schema.Number,
  oldest_hold_ms: Schema.NullOr(Schema.Number),
  acquired_total: Schema.Number,
  busy_total: Schema.Number,
  cap_reached_total: Schema.Number,
  lost_total: Schema.Number,
  /** From pg_locks; null when the database did not answer within a second. */
  held_in_database_by_this_process: Schema.NullOr(Schema.Number),
  held_in_database: Schema.NullOr(Schema.Number),
  /** Conversations this process's run workers hold (serving a run, or kept for the next); 0 without a worker. */
  conversations_served: Schema.Number
})

export class HealthGroup extends HttpApiGroup.make("health", { topLevel: true }).add(
  HttpApiEndpoint.get("health", "/health", { success: Schema.Struct({ status: Schema.Literal("ok") }) }),
  HttpApiEndpoint.get("ready", "/health/ready", {
    success: Schema.Struct({ status: Schema.Literal("ready"), migrationsApplied: Schema.Number }),
    error: Unavailable
  }),
  HttpApiEndpoint.get("orchestrator", "/health/orchestrator", { success: OrchestratorHealth }),
  HttpApiEndpoint.get("metrics", "/metrics", {
    success: Schema.String.pipe(HttpApiSchema.asText({ contentType: "text/plain; version=0.0.4" })),
    error: InternalError
  })
) {}

export const EnqueueRun = Schema.Struct({
  queue: Schema.String,
  organizationId: Schema.String,
  agentId: Schema.optional(Schema.String),
  conversationId: Schema.optional(Schema.String),
  payload: Schema.Record(Schema.String, Schema.Unknown),
  priority: Schema.optional(Schema.Number),
  delayMs: Schema.optional(Schema.Number),
  idempotencyKey: Schema.optional(Schema.String),
  maxAttempts: Schema.optional(Schema.Number)
})

/** GET /v1/runs/{id}: where a run is in its life. Timestamps are ISO 8601. */
export const RunStateBody = Schema.Struct({
  id: Schema.Number,
  queue: Schema.String,
  status: Schema.String,
  attempts: Schema.Number,
  max_attempts: Schema.Number,
  run_at: Schema.String,
  error: Schema.NullOr(Schema.String),
  claimed_by: Schema.NullOr(Schema.String),
  lease_expires_at: Schema.NullOr(Schema.String),
  cancel_requested_at: Schema.NullOr(Schema.String),
  created_at: Schema.String,
  completed_at: Schema.NullOr(Schema.String)
})

export class AdminGroup extends HttpApiGroup.make("admin")
  .add(
    HttpApiEndpoint.post("enqueue", "/runs", {
      payload: EnqueueRun,
      success: Schema.Struct({ id: Schema.Number, created: Schema.Boolean }),
      error: [BadRequest, PayloadTooLarge, InternalError]
    }),
    HttpApiEndpoint.post("runToken", "/runs/:id/token", {
      params: { id: Schema.String },
      success: Schema.Struct({ token: Schema.String }),
      error: [BadRequest, NotFound, Conflict, InternalError]
    }),
    HttpApiEndpoint.get("runState", "/runs/:id", {
      params: { id: Schema.String },
      success: RunStateBody,
      error: [BadRequest, NotFound, InternalError]
    }),
    HttpApiEndpoint.post("cancelRun", "/runs/:id/cancel", {
      params: { id: Schema.String },
      success: Schema.Struct({
        /** "cancelled": it was pending and is cancelled; "cancel_requested": its worker is told at its next report. */
        outcome: Schema.Literals(["cancelled", "cancel_requested", "already_final"]),
        status: Schema.String
      }),
      error: [BadRequest, NotFound, InternalError]
    })
  )
  .middleware(AdminAuth)
  .prefix("/v1")
{}

const runlaneApi = <const Snapshots extends HttpApiGroup.Constraint>(snapshots: Snapshots) =>
  HttpApi.make("runlane")
    .add(snapshots)
    .add(HealthGroup)
    .add(AdminGroup)
    .annotateMerge(OpenApi.annotations({ title: "runlane" }))

/** The whole contract: what /openapi.json documents and a client is generated from. */
export class RunlaneApi extends runlaneApi(SnapshotsGroup) {}

/**
 * What HttpApiBuilder serves: RunlaneApi but for the upload endpoint (see ServedSnapshotsGroup). Group
 * layers built for RunlaneApi fit it too (the same API id and group names).
 */
export class ServedApi extends runlaneApi(ServedSnapshotsGroup) {}
