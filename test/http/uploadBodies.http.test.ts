/**
 * The bound on upload bodies being read at once (src/http/uploadBodies.ts), over the real server and
 * raw sockets: an upload beyond it is answered 503 before its body is sent, and one alone gets in.
 */
import { connect, type Socket } from "node:net"
import { assert, layer } from "@effect/vitest"
import { ConfigProvider, Effect } from "effect"
import { Database } from "../../src/db/Database.ts"
import { uploadBodiesMaxBytes, uploadBodiesVariable } from "../../src/http/uploadBodies.ts"
import { eventually } from "../support/lockHarness.ts"
import { runWithToken, TestServer, testServerLayer } from "../support/httpHarness.ts"

const budget = 1_000

/** An upload body of exactly `bytes` bytes. */
const bodyOf = (runId: number, bytes: number): string => {
  const empty = JSON.stringify({ runId, terminalStatus: "completed", snapshotJsonl: "\n" })
  return JSON.stringify({ runId, terminalStatus: "completed", snapshotJsonl: "x".repeat(bytes - empty.length) + "\n" })
}

const head = (token: string, length: number) =>
  `POST /worker/transcript/snapshot HTTP/1.1\r\nhost: x\r\nauthorization: Bearer ${token}\r\n` +
  `content-type: application/json\r\ncontent-length: ${length}\r\n\r\n`

/** A socket to the server and the text it answers, resolved at the end of the answer's head. */
const open = (port: number) => {
  const socket = connect(port, "127.0.0.1")
  const answer = new Promise<string>((resolve, reject) => {
    let text = ""
    socket.on("data", (data) => {
      text += data.toString("latin1")
      if (text.includes("\r\n\r\n")) resolve(text)
    })
    socket.on("error", reject)
  })
  return { socket, answer }
}

/** The head of the answer to `socket`, or undefined when none came within `ms` (the server is reading). */
const answeredWithin = (answer: Promise<string>, ms: number) =>
  Promise.race([answer, new Promise<undefined>((resolve) => setTimeout(() => resolve(undefined), ms))])

const write = (socket: Socket, text: string) => new Promise<void>((resolve) => socket.write(text, () => resolve()))

layer(testServerLayer({ env: { [uploadBodiesVariable]: String(budget) } }), { excludeTestServices: true })("upload bodies being read", (it) => {
  it.effect("beyond their bound an upload is 503 with Retry-After before its body is sent; one alone gets in whatever its size", () =>
    Effect.gen(function*() {
      const { port } = yield* TestServer
      const { sql } = yield* Database
      const first = yield* runWithToken({ organizationId: "o", agentId: "a", conversationId: "c-bodies-1" })
      const second = yield* runWithToken({ organizationId: "o", agentId: "a", conversationId: "c-bodies-2" })
      const firstBody = bodyOf(first.runId, 800)
      const reading = open(port)
      yield* Effect.promise(() => write(reading.socket, head(first.token, firstBody.length) + firstBody.slice(0, 10)))
      // Once the first body holds 800 of the 1,000 bytes, another 800 is refused on its head alone.
      let refused = ""
      yield* eventually("an upload refused while the first body is read", Effect.promise(async () => {
        const probe = open(port)
        await write(probe.socket, head(second.token, 800))
        const answer = await answeredWithin(probe.answer, 1_000)
        probe.socket.destroy()
        refused = answer ?? ""
        return answer !== undefined
      }), 10_000)
      assert.match(refused, /^HTTP\/1\.1 503 /)
      assert.match(refused, /\r\nretry-after: 1\r\n/i)
      yield* Effect.promise(() => write(reading.socket, firstBody.slice(10)))
      const firstAnswer = yield* Effect.promise(() => reading.answer)
      reading.socket.destroy()
      assert.match(firstAnswer, /^HTTP\/1\.1 200 /)
      // Alone, a body over the bound gets in.
      const secondBody = bodyOf(second.runId, 1_200)
      const alone = open(port)
      yield* Effect.promise(() => write(alone.socket, head(second.token, secondBody.length) + secondBody))
      const aloneAnswer = yield* Effect.promise(() => alone.answer)
      alone.socket.destroy()
      assert.match(aloneAnswer, /^HTTP\/1\.1 200 /)
      const [stored] = yield* Effect.promise(() =>
        sql<Array<{ n: number }>>`select count(*)::int as n from agent_transcript_snapshots where run_id in (${first.runId}, ${second.runId})`)
      assert.strictEqual(stored!.n, 2)
    }))

  it.effect(`${uploadBodiesVariable} must be a positive whole number, naming the variable`, () =>
    Effect.gen(function*() {
      for (const value of ["0", "lots", "-5"]) {
        const error = yield* uploadBodiesMaxBytes.pipe(
          Effect.provide(ConfigProvider.layer(ConfigProvider.fromEnvRecord({ [uploadBodiesVariable]: value }))),
          Effect.flip
        )
        assert.strictEqual(error.variable, uploadBodiesVariable)
        assert.include(error.message, uploadBodiesVariable)
      }
    }))
})
