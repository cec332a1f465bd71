/**
 * The handler `npm start` runs its work loop with: a stand-in for an agent worker, doing what a real
 * one does around its model call. For a run of a conversation it
 *   1. hydrates from the conversation's latest completed transcript (one JSON line per turn),
 *   2. "thinks" for `payload.workMs` (default 50 ms; at most a minute),
 *   3. appends its turn and uploads the transcript through the HTTP API with the run's worker token,
 * and then answers, which completes the run. A run without a conversation only thinks.
 *
 * `payload.failAttempts: n` makes the first n attempts fail before anything is uploaded, to show
 * retries (`npm run demo` uses it).
 */
import { Effect, Option, Schema } from "effect"
import type { RunHandlerInput } from "../runs/RunWorker.ts"

export const demoDefaults = { workMs: 50, maxWorkMs: 60_000 } as const

/** What the demo handler refuses or fails with; the run's error text says which. */
export class DemoRunFailed extends Schema.TaggedError<DemoRunFailed>()("DemoRunFailed", {
  runId: Schema.Number,
  message: Schema.String
}) {}

/** One turn of the transcript the demo keeps. */
export interface DemoTurn {
  readonly run: number
  readonly attempt: number
  readonly text: string
  readonly at: string
}

const wholeNumber = (value: unknown, max: number): number | undefined =>
  typeof value === "number" && Number.isInteger(value) && value >= 0 && value <= max ? value : undefined

/** The demo handler, uploading to the service at `baseUrl` (its own HTTP API). */
export const makeDemoHandler = (baseUrl: string) => ({ run, transcript, token }: RunHandlerInput) =>
  Effect.gen(function*() {
    const fail = (message: string) => new DemoRunFailed({ runId: run.id, message })
    const workMs = run.payload["workMs"] === undefined ? demoDefaults.workMs : wholeNumber(run.payload["workMs"], demoDefaults.maxWorkMs)
    if (workMs === undefined) return yield* fail(`payload.workMs must be a whole number of milliseconds up to ${demoDefaults.maxWorkMs}`)
    const failAttempts = wholeNumber(run.payload["failAttempts"], 100) ?? 0
    yield* Effect.sleep(workMs)
    if (run.attempts < failAttempts) return yield* fail(`attempt ${run.attempts + 1} fails on purpose (payload.failAttempts = ${failAttempts})`)
    if (run.conversationId === null || token === undefined) return

    const earlier = Option.getOrElse(transcript, () => "").trimEnd()
    const turn: DemoTurn = {
      run: run.id,
      attempt: run.attempts + 1,
      text: `turn ${earlier === "" ? 1 : earlier.split("\n").length + 1} of ${run.conversationId}`,
      at: new Date().toISOString()
    }
    const snapshotJsonl = `${earlier === "" ? "" : `${earlier}\n`}${JSON.stringify(turn)}\n`
    const response = yield* Effect.tryPromise({
      try: (signal) =>
        fetch(`${baseUrl}/worker/transcript/snapshot`, {
          method: "POST",
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
          body: JSON.stringify({ runId: run.id, terminalStatus: "completed", snapshotJsonl }),
          signal
        }).then(async (answer) => ({ status: answer.status, body: await answer.text() })),
      catch: (cause) => fail(`transcript upload failed: ${String(cause)}`)
    })
    // 409: this run's snapshot is already stored (first writer wins), so an earlier execution of this
    // run got as far as its upload (then lost its lock, or its worker stopped): the turn is there.
    if (response.status !== 200 && response.status !== 409) {
      return yield* fail(`transcript upload answered ${response.status}: ${response.body.slice(0, 200)}`)
    }
  })
