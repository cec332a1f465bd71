/** The typed failures of conversation locks. */
import { Schema } from "effect"

/**
 * Builds an expected refusal without a stack trace. Busy and cap refusals are outcomes, not bugs, and
 * come by the thousand under contention: capturing a stack was the largest single cost of a refused
 * acquire (npm run bench, "acquires under contention": 0.28 of hand-written with stacks, see the
 * closing note of issue 9 for the figure without).
 */
export const refusal = <E>(make: () => E): E => {
  const stackTraceLimit = Error.stackTraceLimit
  Error.stackTraceLimit = 0
  try {
    return make()
  } finally {
    Error.stackTraceLimit = stackTraceLimit
  }
}

export class ConversationBusy extends Schema.TaggedError<ConversationBusy>()("ConversationBusy", {
  organizationId: Schema.String,
  agentId: Schema.String,
  conversationId: Schema.String
}) {}

/** This process already pins as many connections as its cap allows. The count was not changed. */
export class LockCapReached extends Schema.TaggedError<LockCapReached>()("LockCapReached", {
  count: Schema.Number,
  cap: Schema.Number
}) {}

/** The session holding the lock died, or stopped answering, while the lock was held. */
export class LockLost extends Schema.TaggedError<LockLost>()("LockLost", {
  organizationId: Schema.String,
  agentId: Schema.String,
  conversationId: Schema.String,
  backendPid: Schema.Number,
  reason: Schema.String
}) {}

/** A setting that would make locks unsafe; the service refuses to start. */
export class LockConfigError extends Schema.TaggedError<LockConfigError>()("LockConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}
