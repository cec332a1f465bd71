/**
 * Resident memory of the service as `npm start` runs it (`node dist/service/main.js`, the esbuild
 * bundle), idle and under load, against a bare `node:http` process answering 200 to the same load.
 * Both are separate processes started the same way, measured from /proc (Linux only).
 *
 * Idle is read once the process has listened and then sat for `settleMs`; under load is the peak
 * (VmHWM) after `requests` GET /health/orchestrator requests, `concurrency` in flight: that route reads
 * pg_locks, so each request goes through the router, a pool connection and a query.
 */
import { type ChildProcess, spawn } from "node:child_process"
import { randomBytes } from "node:crypto"
import { readFileSync } from "node:fs"
import { Agent, request as httpRequest } from "node:http"
import { fileURLToPath } from "node:url"
import { Effect } from "effect"
import type { BenchResult } from "./harness.ts"

const projectRoot = fileURLToPath(new URL("..", import.meta.url))
const builtEntry = "dist/service/main.js"
/** Time for start-up garbage to be collected and the heap to settle before idle is read. */
const settleMs = 3_000
const requests = 2_000
const concurrency = 16

const bareServer = `
  require("node:http").createServer((req, res) => { req.resume(); res.end("ok") })
    .listen(0, "127.0.0.1", function () { console.log("listening on http://127.0.0.1:" + this.address().port) })
`

/** The process's resident set and its peak so far, in MB. */
const residentMb = (pid: number): { rss: number; peak: number } => {
  const status = readFileSync(`/proc/${pid}/status`, "utf8")
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? Number.NaN)
  return { rss: kb("VmRSS") / 1024, peak: kb("VmHWM") / 1024 }
}

/** Starts a process and resolves with it and its base URL once it prints that it listens. */
const listening = (args: ReadonlyArray<string>, env: Record<string, string>) =>
  new Promise<{ child: ChildProcess; base: string }>((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: projectRoot, env: { PATH: process.env["PATH"] ?? "", ...env } })
    let output = ""
    const onData = (chunk: Buffer) => {
      output += chunk.toString("utf8")
      const match = /listening on (http:\/\/[0-9.]+:[0-9]+)/.exec(output)
      if (match !== null) resolve({ child, base: match[1]! })
    }
    child.stdout.on("data", onData)
    child.stderr.on("data", onData)
    child.once("exit", (code) => reject(new Error(`${args.join(" ")} exited (${code}) before listening:\n${output}`)))
  })

const get = (agent: Agent, url: string): Promise<number> =>
  new Promise((resolve, reject) => {
    const req = httpRequest(url, { agent }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode ?? 0))
    })
    req.on("error", reject)
    req.end()
  })

const load = async (url: string): Promise<void> => {
  const agent = new Agent({ keepAlive: true, maxSockets: concurrency })
  let sent = 0
  try {
    await Promise.all(Array.from({ length: concurrency }, async () => {
      while (sent++ < requests) {
        const status = await get(agent, url)
        if (status !== 200) throw new Error(`${url} answered ${status}`)
      }
    }))
  } finally {
    agent.destroy()
  }
}

/** Idle and peak-under-load RSS of one process; it is stopped afterwards. */
const measure = async (args: ReadonlyArray<string>, env: Record<string, string>, path: string) => {
  const { child, base } = await listening(args, env)
  try {
    await new Promise((resolve) => setTimeout(resolve, settleMs))
    const idle = residentMb(child.pid!).rss
    await load(`${base}${path}`)
    return { idle, loaded: residentMb(child.pid!).peak }
  } finally {
    const exited = new Promise((resolve) => child.once("exit", resolve))
    child.kill("SIGTERM")
    await exited
  }
}

export const memoryBenchmarks = (url: string): Effect.Effect<Array<BenchResult>> =>
  Effect.promise(async () => {
    const service = await measure([builtEntry], {
      DATABASE_URL: url,
      RUNLANE_TOKEN_SECRET: randomBytes(32).toString("base64url"),
      PORT: "0"
    }, "/health/orchestrator")
    const bare = await measure(["-e", bareServer], {}, "/")
    const note = "MB resident; baseline: a bare node:http process under the same load"
    return [
      { name: "service RSS, idle", value: service.idle, unit: "MB", baseline: bare.idle, ratio: bare.idle / service.idle, note },
      {
        name: `service RSS, peak under load (${requests} requests, ${concurrency} in flight)`,
        value: service.loaded,
        unit: "MB",
        baseline: bare.loaded,
        ratio: bare.loaded / service.loaded,
        note
      }
    ]
  })
