/**
 * The expected outcomes of claiming and settling runs that are not successes, as typed failures a
 * caller can `catchTag`. Database trouble stays a DatabaseError.
 */
import { Schema } from "effect"

/**
 * The run is no longer claimed by this claimant: the sweep took it back after its lease ran out (and
 * another worker may run it now), or it was already settled. Whatever the handler did is not recorded.
 */
export class LeaseLost extends Schema.TaggedError<LeaseLost>()("LeaseLost", {
  runId: Schema.Number,
  /** The transition that found the run gone, e.g. "complete". */
  operation: Schema.String
}) {}

/**
 * The run's cancellation was requested while it was claimed; the heartbeat or settle that reports this
 * has ended it `cancelled`. The handler should stop; nothing else is recorded.
 */
export class RunCancelled extends Schema.TaggedError<RunCancelled>()("RunCancelled", {
  runId: Schema.Number
}) {}

export class RunNotFound extends Schema.TaggedError<RunNotFound>()("RunNotFound", {
  runId: Schema.Number
}) {}

/** An argument of a claim or settle that cannot be right, named with what it must be. */
export class InvalidRunsArgument extends Schema.TaggedError<InvalidRunsArgument>()("InvalidRunsArgument", {
  argument: Schema.String,
  message: Schema.String
}) {}

/** A RunsQueue setting that cannot work, naming the option or environment variable. */
export class RunsConfigError extends Schema.TaggedError<RunsConfigError>()("RunsConfigError", {
  setting: Schema.String,
  message: Schema.String
}) {}
