/**
 * GET /health, /health/ready, /health/orchestrator and /metrics. None needs a token (they are meant
 * for load balancers and scrapers); none reveals a tenant's data or the deployment's internals (a
 * failed readiness check says what kind of failure, the details go to the log). Their database
 * queries share a small budget (probeBudget.ts), so anonymous callers can never starve the pool.
 */
import { Effect, Option } from "effect"
import { HttpApiBuilder } from "effect/http-api"
import { HttpServerResponse } from "effect/http"
import { PrometheusMetrics } from "effect/observability"
import { Migrator } from "../db/Migrator.ts"
import { ConversationLocks } from "../locks/ConversationLocks.ts"
import { RunsQueue } from "../runs/RunsQueue.ts"
import { RunWorker } from "../runs/RunWorker.ts"
import { TranscriptSnapshots } from "../snapshots/TranscriptSnapshots.ts"
import { makeProbeBudget } from "./probeBudget.ts"
import { lockMetricsText, runCountsText, uploadQueueText } from "./prometheusText.ts"
import { makeRunCountsCache } from "./runCountsCache.ts"
import { RunlaneApi, Unavailable } from "./RunlaneApi.ts"

/** /health/orchestrator answers without the pg_locks figures rather than wait longer than this. */
export const orchestratorDatabaseTimeoutMs = 1_000

/** /health/ready answers 503 rather than wait longer than this for the migration state. */
export const readyDatabaseTimeoutMs = 2_000

const notAnswering = new Unavailable({ error: "Database unavailable" })

export const HealthHandlers = HttpApiBuilder.group(
  RunlaneApi,
  "health",
  Effect.fnUntraced(function*(handlers) {
    const migrator = yield* Migrator
    const locks = yield* ConversationLocks
    const queue = yield* RunsQueue
    const snapshots = yield* TranscriptSnapshots
    // The service runs a worker; a host application mounting the routes may not.
    const worker = yield* Effect.serviceOption(RunWorker)
    const conversationsServed = Option.isSome(worker) ? worker.value.conversationsServed : Effect.succeed(0)
    const budget = yield* makeProbeBudget
    const runCounts = makeRunCountsCache(queue.counts, budget)

    return handlers.handleAll({
      health: () => Effect.succeed({ status: "ok" as const }),
      ready: () =>
        Effect.gen(function*() {
          // Reading the migration state is itself a round trip: it also proves the database answers.
          const status = yield* budget.run(migrator.status, readyDatabaseTimeoutMs)
          if (Option.isNone(status)) return yield* notAnswering
          const pending = status.value.pending.length
          if (pending > 0) return yield* new Unavailable({ error: `${pending} migration(s) pending` })
          const backfills = yield* budget.run(migrator.unfinishedBackfills, readyDatabaseTimeoutMs)
          if (Option.isNone(backfills)) return yield* notAnswering
          if (backfills.value.length > 0) {
            // The name goes to the log only, like migration names: anonymous callers get the reason.
            yield* Effect.logWarning("readiness: a required backfill is unfinished", { backfills: backfills.value })
            return yield* new Unavailable({ error: "Backfill unfinished" })
          }
          return { status: "ready" as const, migrationsApplied: status.value.applied.length }
        }).pipe(
          Effect.catchTags({
            DatabaseError: (error) =>
              Effect.logWarning("readiness check failed", { message: error.message }).pipe(
                Effect.andThen(Effect.fail(notAnswering))
              ),
            MigrationError: (error) =>
              Effect.logError("readiness check: the migrations do not match this version", {
                migration: error.migration,
                message: error.message
              }).pipe(Effect.andThen(Effect.fail(new Unavailable({ error: "Migrations do not match this version" }))))
          })
        ),
      orchestrator: () =>
        Effect.gen(function*() {
          const usage = yield* locks.localUsage
          // The local figures never wait on the database; the pg_locks ones are best effort.
          const inDatabase = yield* budget.run(locks.usage, orchestratorDatabaseTimeoutMs).pipe(
            Effect.map(Option.getOrUndefined),
            Effect.catch(() => Effect.succeed(undefined))
          )
          return {
            status: "ok" as const,
            reserved_conversation_locks: usage.held + usage.inFlight + usage.stranded,
            reserved_conversation_locks_cap: usage.cap,
            near_cap: usage.nearCap,
            held: usage.held,
            in_flight: usage.inFlight,
            stranded: usage.stranded,
            oldest_hold_ms: usage.oldestHoldMs,
            acquired_total: usage.acquired,
            busy_total: usage.busy,
            cap_reached_total: usage.capReached,
            lost_total: usage.lost,
            held_in_database_by_this_process: inDatabase?.heldInDatabaseByThisProcess ?? null,
            held_in_database: inDatabase?.heldInDatabase ?? null,
            conversations_served: yield* conversationsServed
          }
        }),
      metrics: () =>
        Effect.gen(function*() {
          const usage = yield* locks.localUsage
          const counts = yield* runCounts
          const uploads = yield* snapshots.uploadQueue
          const http = yield* PrometheusMetrics.format()
          return HttpServerResponse.text(lockMetricsText(usage) + runCountsText(counts) + uploadQueueText(uploads) + http, {
            contentType: "text/plain; version=0.0.4; charset=utf-8"
          })
        })
    })
  })
)
