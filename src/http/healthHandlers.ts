/**
 * GET /health, /health/ready, /health/orchestrator and /metrics. None needs a token (they are meant
 * for load balancers and scrapers); none reveals a tenant's data.
 */
import { Effect, Option } from "effect"
import { HttpApiBuilder } from "effect/http-api"
import { HttpServerResponse } from "effect/http"
import { PrometheusMetrics } from "effect/observability"
import { Migrator } from "../db/Migrator.ts"
import { ConversationLocks } from "../locks/ConversationLocks.ts"
import { type RunCount, RunsQueue } from "../runs/RunsQueue.ts"
import { lockMetricsText, runCountsText } from "./prometheusText.ts"
import { RunlaneApi, Unavailable } from "./RunlaneApi.ts"

/** /health/orchestrator answers without the pg_locks figures rather than wait longer than this. */
export const orchestratorDatabaseTimeoutMs = 1_000

/** Run counts read the whole runs table, so a scrape reuses an answer younger than this. */
export const runCountsMaxAgeMs = 15_000

export const HealthHandlers = HttpApiBuilder.group(
  RunlaneApi,
  "health",
  Effect.fnUntraced(function*(handlers) {
    const migrator = yield* Migrator
    const locks = yield* ConversationLocks
    const queue = yield* RunsQueue

    let cachedCounts: { readonly at: number; readonly counts: ReadonlyArray<RunCount> } | undefined
    const runCounts = Effect.suspend(() => {
      if (cachedCounts !== undefined && Date.now() - cachedCounts.at < runCountsMaxAgeMs) {
        return Effect.succeed(cachedCounts.counts)
      }
      return queue.counts.pipe(
        Effect.tap((counts) => Effect.sync(() => (cachedCounts = { at: Date.now(), counts }))),
        Effect.catch((error) =>
          Effect.as(Effect.logWarning("run counts for /metrics could not be read", { message: error.message }), undefined)
        )
      )
    })

    return handlers.handleAll({
      health: () => Effect.succeed({ status: "ok" as const }),
      ready: () =>
        Effect.gen(function*() {
          // Reading the migration state is itself a round trip: it also proves the database answers.
          const status = yield* migrator.status
          if (status.pending.length > 0) {
            return yield* new Unavailable({ error: `${status.pending.length} migration(s) pending` })
          }
          const backfills = yield* migrator.unfinishedBackfills
          if (backfills.length > 0) {
            return yield* new Unavailable({ error: `Backfill unfinished: npm run db:backfill -- ${backfills[0]}` })
          }
          return { status: "ready" as const, migrationsApplied: status.applied.length }
        }).pipe(
          Effect.catchTags({
            DatabaseError: (error) =>
              Effect.logWarning("readiness check failed", { message: error.message }).pipe(
                Effect.andThen(Effect.fail(new Unavailable({ error: "Database unavailable" })))
              ),
            MigrationError: (error) => Effect.fail(new Unavailable({ error: error.message }))
          })
        ),
      orchestrator: () =>
        Effect.gen(function*() {
          const usage = yield* locks.localUsage
          // The local figures never wait on the database; the pg_locks ones are best effort.
          const inDatabase = yield* locks.usage.pipe(
            Effect.timeoutOption(orchestratorDatabaseTimeoutMs),
            Effect.map(Option.getOrUndefined),
            Effect.catch(() => Effect.succeed(undefined))
          )
          return {
            status: "ok" as const,
            reserved_conversation_locks: usage.held + usage.inFlight,
            reserved_conversation_locks_cap: usage.cap,
            near_cap: usage.nearCap,
            held: usage.held,
            in_flight: usage.inFlight,
            oldest_hold_ms: usage.oldestHoldMs,
            acquired_total: usage.acquired,
            busy_total: usage.busy,
            cap_reached_total: usage.capReached,
            lost_total: usage.lost,
            held_in_database_by_this_process: inDatabase?.heldInDatabaseByThisProcess ?? null,
            held_in_database: inDatabase?.heldInDatabase ?? null
          }
        }),
      metrics: () =>
        Effect.gen(function*() {
          const usage = yield* locks.localUsage
          const counts = yield* runCounts
          const http = yield* PrometheusMetrics.format()
          return HttpServerResponse.text(lockMetricsText(usage) + runCountsText(counts) + http, {
            contentType: "text/plain; version=0.0.4; charset=utf-8"
          })
        })
    })
  })
)
