/**
 * The service's exit code. A shutdown asked for by SIGINT or SIGTERM that closed everything cleanly is
 * a success (0): process managers such as systemd or Kubernetes would otherwise report every ordinary
 * stop as a failure. Anything else keeps Effect's default (1 for an error, such as a bad setting).
 */
import { Cause, Exit, Runtime } from "effect"

export const serviceTeardown: Runtime.Teardown = (exit, onExit) => {
  if (Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) return onExit(0)
  return Runtime.defaultTeardown(exit, onExit)
}
