/**
 * The service as a separate process, with its output collected for assertions: `builtEntry` is what
 * `npm start` runs (`node dist/service/main.js`, built by globalSetup as `npm start` builds it); a
 * `.ts` entry runs through tsx. Only the variables given are set, besides PATH and HOME.
 */
import { spawn } from "node:child_process"
import { fileURLToPath } from "node:url"

export const projectRoot = fileURLToPath(new URL("../..", import.meta.url))
export const mainEntry = "src/main.ts"
/** The output of `npm run build`, which `npm start` runs. */
export const builtEntry = "dist/service/main.js"

export interface ServiceProcess {
  readonly output: () => string
  /** Resolves with the first match in the output so far or to come; rejects after `timeoutMs`. */
  readonly waitFor: (pattern: RegExp, timeoutMs?: number) => Promise<RegExpMatchArray>
  readonly exited: Promise<{ readonly code: number | null; readonly signal: NodeJS.Signals | null }>
  readonly signal: (signal: NodeJS.Signals) => void
  /** Whether the process has exited. */
  readonly done: () => boolean
}

export const startService = (entry: string, env: Record<string, string>, args: ReadonlyArray<string> = []): ServiceProcess => {
  const child = spawn(process.execPath, [...(entry.endsWith(".ts") ? ["--import", "tsx", entry] : [entry]), ...args], {
    cwd: projectRoot,
    env: { PATH: process.env["PATH"] ?? "", HOME: process.env["HOME"] ?? "", ...env },
    stdio: ["ignore", "pipe", "pipe"]
  })
  let output = ""
  const listeners = new Set<() => void>()
  const append = (chunk: Buffer) => {
    output += chunk.toString("utf8")
    for (const listener of listeners) listener()
  }
  child.stdout.on("data", append)
  child.stderr.on("data", append)
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => {
      resolve({ code, signal })
      for (const listener of listeners) listener()
    })
  )
  let done = false
  void exited.then(() => (done = true))

  const waitFor = (pattern: RegExp, timeoutMs = 30_000) =>
    new Promise<RegExpMatchArray>((resolve, reject) => {
      const check = () => {
        const match = output.match(pattern)
        if (match !== null) {
          finish()
          resolve(match)
        } else if (done) {
          finish()
          reject(new Error(`exited before ${pattern} appeared; output:\n${output}`))
        }
      }
      const timer = setTimeout(() => {
        finish()
        reject(new Error(`${pattern} did not appear within ${timeoutMs} ms; output:\n${output}`))
      }, timeoutMs)
      const finish = () => {
        clearTimeout(timer)
        listeners.delete(check)
      }
      listeners.add(check)
      check()
    })

  return { output: () => output, waitFor, exited, signal: (signal) => child.kill(signal), done: () => done }
}

/** Bounded wait for the process to end. */
export const exitWithin = (service: ServiceProcess, timeoutMs: number) =>
  Promise.race([
    service.exited,
    new Promise<never>((_, reject) =>
      setTimeout(() => reject(new Error(`did not exit within ${timeoutMs} ms; output:\n${service.output()}`)), timeoutMs)
    )
  ])
