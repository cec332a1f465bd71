/**
 * GET and DELETE /worker/transcript/snapshot. The scope (organization, agent, conversation) always
 * comes from the verified token, never from the request. The upload (POST) is a plain router route:
 * snapshotUpload.ts.
 */
import { Effect, Option } from "effect"
import { HttpApiBuilder } from "effect/http-api"
import { HttpServerResponse } from "effect/http"
import { TranscriptSnapshots } from "../snapshots/TranscriptSnapshots.ts"
import { answerDatabaseFailure } from "./internalError.ts"
import { NotFound, ServedApi, WorkerIdentity } from "./RunlaneApi.ts"

export const SnapshotHandlers = HttpApiBuilder.group(
  ServedApi,
  "snapshots",
  Effect.fnUntraced(function*(handlers) {
    const snapshots = yield* TranscriptSnapshots

    return handlers
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
