/**
 * POST /v1/runs (enqueue through RunsQueue.send), POST /v1/runs/{id}/token (the run's worker token),
 * GET /v1/runs/{id} (its dispatch state) and POST /v1/runs/{id}/cancel, behind the operator's bearer token.
 */
import { Effect, Option, Predicate } from "effect"
import { HttpApiBuilder } from "effect/http-api"
import { RunOwnership } from "../ownership/RunOwnership.ts"
import { WorkerTokens } from "../ownership/WorkerTokens.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"
import type { RunNotFound } from "../runs/runErrors.ts"
import { RunsQueue } from "../runs/RunsQueue.ts"
import type { SendRunInput } from "../runs/runInput.ts"
import { answerDatabaseFailure } from "./internalError.ts"
import { parseJson, readBodyText } from "./requestBody.ts"
import { BadRequest, Conflict, NotFound, RunlaneApi } from "./RunlaneApi.ts"

/** An enqueue body: a run's payload is meant to be small (ids and a prompt), not a document store. */
export const maxEnqueueBodyBytes = 1024 * 1024

const enqueueFields: ReadonlySet<string> = new Set([
  "queue",
  "organizationId",
  "agentId",
  "conversationId",
  "payload",
  "priority",
  "delayMs",
  "idempotencyKey",
  "maxAttempts",
  "retryDelaySeconds"
])

/** Pure: the decimal text of a positive safe integer, or undefined (no signs, no exponent, no dot). */
export const parseRunId = (text: string): number | undefined => {
  if (!/^[1-9][0-9]{0,15}$/.test(text)) return undefined
  const id = Number(text)
  return Number.isSafeInteger(id) ? id : undefined
}

const runIdParameter = (text: string) => {
  const runId = parseRunId(text)
  return runId === undefined
    ? Effect.fail(new BadRequest({ error: "Run id must be a positive integer", field: "id" }))
    : Effect.succeed(runId)
}

const noSuchRun = <A, R>(effect: Effect.Effect<A, RunNotFound | DatabaseError, R>) =>
  Effect.catchTag(effect, "RunNotFound", () => Effect.fail(new NotFound({ error: "No such run" })))

export const AdminHandlers = HttpApiBuilder.group(
  RunlaneApi,
  "admin",
  Effect.fnUntraced(function*(handlers) {
    const queue = yield* RunsQueue
    const ownership = yield* RunOwnership
    const tokens = yield* WorkerTokens

    return handlers
      .handleRaw("enqueue", ({ request }) =>
        Effect.gen(function*() {
          const body = yield* Effect.flatMap(readBodyText(request, maxEnqueueBodyBytes), parseJson)
          if (!Predicate.isObject(body) || Array.isArray(body)) {
            return yield* new BadRequest({ error: "The body must be a JSON object" })
          }
          // A misspelt option would otherwise be silently ignored and the run enqueued without it.
          const unknown = Object.keys(body).find((key) => !enqueueFields.has(key))
          if (unknown !== undefined) return yield* new BadRequest({ error: `Unknown field ${unknown}`, field: unknown })
          return yield* queue.send(body as unknown as SendRunInput).pipe(
            Effect.catchTag("InvalidRunInput", (invalid) =>
              Effect.fail(new BadRequest({ error: `${invalid.field} ${invalid.message}`, field: invalid.field })))
          )
        }).pipe(answerDatabaseFailure))
      .handle("runToken", ({ params }) =>
        Effect.gen(function*() {
          const runId = parseRunId(params.id)
          if (runId === undefined) {
            return yield* new BadRequest({ error: "Run id must be a positive integer", field: "id" })
          }
          const scope = yield* ownership.scopeOf(runId)
          if (Option.isNone(scope)) return yield* new NotFound({ error: "No such run" })
          const { organizationId, agentId, conversationId } = scope.value
          if (agentId === undefined || conversationId === undefined) {
            return yield* new Conflict({ error: "The run has no agent or conversation, so no worker token scopes it" })
          }
          return { token: yield* tokens.mintRunToken({ organizationId, agentId, conversationId }, runId) }
        }).pipe(answerDatabaseFailure))
      .handle("runState", ({ params }) =>
        Effect.gen(function*() {
          const run = yield* queue.get(yield* runIdParameter(params.id)).pipe(noSuchRun)
          const iso = (date: Date | null) => (date === null ? null : date.toISOString())
          return {
            id: run.id,
            queue: run.queue,
            status: run.status,
            attempts: run.attempts,
            max_attempts: run.maxAttempts,
            run_at: run.runAt.toISOString(),
            error: run.error,
            claimed_by: run.claimedBy,
            lease_expires_at: iso(run.leaseExpiresAt),
            cancel_requested_at: iso(run.cancelRequestedAt),
            created_at: run.createdAt.toISOString(),
            completed_at: iso(run.completedAt)
          }
        }).pipe(answerDatabaseFailure))
      .handle("cancelRun", ({ params }) =>
        Effect.gen(function*() {
          // The cancel statement's answer already says the status: no second read.
          const outcome = yield* queue.cancel(yield* runIdParameter(params.id)).pipe(noSuchRun)
          switch (outcome._tag) {
            case "Cancelled":
              return { outcome: "cancelled" as const, status: "cancelled" }
            case "CancelRequested":
              return { outcome: "cancel_requested" as const, status: "claimed" }
            case "AlreadyFinal":
              return { outcome: "already_final" as const, status: outcome.status }
          }
        }).pipe(answerDatabaseFailure))
  })
)
