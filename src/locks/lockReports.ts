/** The log line a lock session's end deserves: nothing when it ended cleanly, an error when it did not. */
import { Effect } from "effect"
import type { ConversationKey } from "./lockKey.ts"
import type { SessionEnd } from "./lockSession.ts"

export const describeProblems = (end: SessionEnd): ReadonlyArray<string> => {
  const problems: Array<string> = []
  if (end.unlock === "not held") problems.push("the lock was not held at unlock; the session was terminated")
  if (typeof end.unlock === "object") problems.push("unlock failed after retries; the session was terminated")
  if (end.unlock === "skipped" && end.connection !== "stranded") {
    problems.push("the session's lock state was unknown; it was terminated")
  }
  if (end.connection === "stranded") {
    problems.push("the session could not be confirmed ended; it stays counted as stranded and its terminate is retried")
  }
  if (typeof end.connection === "object") problems.push("returning the connection to the pool threw")
  return problems
}

export const reportSessionEnd = (end: SessionEnd, key: ConversationKey, backendPid: number) => {
  const problems = describeProblems(end)
  if (problems.length === 0) return Effect.void
  const cause = typeof end.unlock === "object"
    ? end.unlock.failed
    : typeof end.connection === "object"
    ? end.connection.releaseFailed
    : undefined
  const connection = typeof end.connection === "object" ? "release failed" : end.connection
  return Effect.logError("Conversation lock release had problems", problems.join("; "), ...(cause === undefined ? [] : [cause])).pipe(
    Effect.annotateLogs({ ...key, backendPid, connection })
  )
}
