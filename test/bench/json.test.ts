import { spawn } from "node:child_process"
import { assert, describe, inject, it } from "vitest"
import { projectRoot } from "../support/serviceProcess.ts"

/** Runs `bench/index.ts` with `args` as `npm run bench` does; answers its stdout and stderr apart. */
const bench = (args: ReadonlyArray<string>) =>
  new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    const child = spawn(process.execPath, ["--import", "tsx", "bench/index.ts", ...args], {
      cwd: projectRoot,
      env: { PATH: process.env["PATH"] ?? "", HOME: process.env["HOME"] ?? "", DATABASE_URL: inject("adminUrl") }
    })
    let stdout = ""
    let stderr = ""
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString("utf8")))
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString("utf8")))
    child.once("exit", (code) => resolve({ code, stdout, stderr }))
  })

describe("npm run bench -- --json", () => {
  it("prints exactly a JSON array on stdout; its log lines go to stderr", async () => {
    // No group selected: only the bench database is made, migrated and dropped, which logs.
    const { code, stdout, stderr } = await bench(["--json", "--only=none"])
    assert.strictEqual(code, 0, stderr)
    assert.strictEqual(stdout, "[]\n", `stdout was:\n${stdout}`)
    assert.include(stderr, "Database pool closed")
  })
})
