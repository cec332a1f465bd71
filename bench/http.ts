/**
 * The HTTP service, measured against bare baselines in the same process and run:
 *
 * - snapshot POST throughput (1 KB and 600 KB bodies) vs a bare `node:http` server that reads the same
 *   body and answers 200. The runlane side does everything a real upload does: token verification,
 *   size and field checks, the ownership lookup and the insert (each request a fresh run). More sides
 *   for reading the figure: the upload written by hand, storing one statement per upload and through
 *   runlane's UploadGroups, and the jose token check alone, storing nothing.
 * - `GET latest` median latency vs one `SELECT 1` round trip from postgres.js.
 *
 * The client is Node's `http` with keep-alive connections, CONCURRENCY requests in flight, in this same
 * process for every side; the sides alternate in rounds.
 */
import { Agent, createServer, type IncomingMessage, request as httpRequest, type Server, type ServerResponse } from "node:http"
import { webcrypto } from "node:crypto"
import { jwtVerify } from "jose"
import { Effect, Layer, Redacted } from "effect"
import { HttpServer } from "effect/http"
import postgres from "postgres"
import { Database } from "../src/db/Database.ts"
import { Migrator } from "../src/db/Migrator.ts"
import { httpServerLayer } from "../src/http/server.ts"
import { ConversationLocks } from "../src/locks/ConversationLocks.ts"
import { RunOwnership } from "../src/ownership/RunOwnership.ts"
import { WorkerTokens } from "../src/ownership/WorkerTokens.ts"
import { RunsQueue } from "../src/runs/RunsQueue.ts"
import { TranscriptSnapshots } from "../src/snapshots/TranscriptSnapshots.ts"
import { UploadGroups, type UploadRow } from "../src/snapshots/uploadGroups.ts"
import { type BenchResult, localPostgresCpuMs, median, now } from "./harness.ts"

const concurrency = 16
const secret = Redacted.make("bench-secret-bench-secret-bench-secret-0123")

interface Prepared {
  readonly path: string
  readonly method: string
  readonly headers: Record<string, string>
  readonly body: Buffer | undefined
}

const send = (agent: Agent, port: number, prepared: Prepared): Promise<number> =>
  new Promise((resolve, reject) => {
    const req = httpRequest(
      { agent, host: "127.0.0.1", port, path: prepared.path, method: prepared.method, headers: prepared.headers },
      (res) => {
        res.resume()
        res.on("end", () => resolve(res.statusCode ?? 0))
      }
    )
    req.on("error", reject)
    req.end(prepared.body)
  })

/** Sends every request with `concurrency` in flight; answers requests per second. Any non-200 aborts. */
const throughput = async (agent: Agent, port: number, requests: ReadonlyArray<Prepared>): Promise<number> => {
  // Idle keep-alive sockets are dropped first: a server closes a socket idle past its keepAliveTimeout
  // (5 s; the other sides' rounds take longer), and a request written on it as it closes fails with
  // "socket hang up" (seen once in a bench run). So every batch of every side opens its connections anew.
  for (const sockets of Object.values(agent.freeSockets)) for (const socket of sockets ?? []) socket.destroy()
  let next = 0
  const started = now()
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next < requests.length) {
      const status = await send(agent, port, requests[next++]!)
      if (status !== 200) throw new Error(`benchmark request answered ${status}`)
    }
  }))
  return requests.length / ((now() - started) / 1000)
}

/** A node:http server on an ephemeral port that reads each request's whole body, then calls `respond`. */
const serverReadingBodies = (
  respond: (request: IncomingMessage, body: Buffer, response: ServerResponse) => void
): Promise<Server> =>
  new Promise((resolve) => {
    const server = createServer((request, response) => {
      const chunks: Array<Buffer> = []
      request.on("data", (chunk: Buffer) => chunks.push(chunk))
      request.on("end", () => respond(request, Buffer.concat(chunks), response))
    })
    server.listen(0, "127.0.0.1", () => resolve(server))
  })

const answer = (response: ServerResponse, status: number, json: string) => {
  response.writeHead(status, { "content-type": "application/json" })
  response.end(json)
}

const bareServer = (): Promise<Server> => serverReadingBodies((_request, _body, response) => answer(response, 200, "{\"id\":1}"))

const joseOptions = { algorithms: ["HS256"], issuer: "runlane", audience: "runlane-worker", clockTolerance: 30 }

/** What every jose-checked side does first: the token verified as WorkerTokens does it, the body parsed. */
const checkUpload = async (request: IncomingMessage, body: Buffer, key: webcrypto.CryptoKey) => {
  const { payload } = await jwtVerify((request.headers.authorization ?? "").slice(7), key, joseOptions)
  return { payload, upload: JSON.parse(body.toString("utf8")) }
}

/**
 * A reference, not a competitor: the token check alone and the body parsed, nothing stored. No upload
 * that checks its token with jose can go faster than this here, so it shows how much of the bare
 * server's rate the check by itself leaves.
 */
const tokenCheckOnlyServer = (key: webcrypto.CryptoKey): Promise<Server> =>
  serverReadingBodies(async (request, body, response) => {
    try {
      const { payload, upload } = await checkUpload(request, body, key)
      answer(response, payload["run"] === upload.runId ? 200 : 403, "{\"id\":1}")
    } catch {
      answer(response, 401, "{\"error\":\"Invalid token\"}")
    }
  })

/** Stores one checked upload; answers the snapshot id, or undefined when nothing was stored. */
type StoreUpload = (row: UploadRow) => Promise<string | undefined>

/** The one-statement ownership-checked insert, one statement per upload. */
const storeOneByOne = (sql: postgres.Sql): StoreUpload => async (row) => {
  const rows = await sql<Array<{ id: string }>>`
    insert into agent_transcript_snapshots
      (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
    select organization_id, agent_id, conversation_id, id, ${row.snapshotJsonl}, ${row.bytes}, ${row.terminalStatus}
      from runs
     where id = ${row.runId} and organization_id = ${row.organizationId}
       and agent_id = ${row.agentId} and conversation_id = ${row.conversationId}
    on conflict (organization_id, agent_id, conversation_id, run_id) do nothing
    returning id::text`
  return rows[0]?.id
}

/** The same insert through runlane's UploadGroups: concurrent uploads share statements. */
const storeGrouped = (sql: postgres.Sql): StoreUpload => {
  const groups = new UploadGroups(sql)
  return (row) =>
    new Promise((resolve, reject) =>
      groups.submit(row, (error, id) => error === undefined ? resolve(id) : reject(error)))
}

/**
 * The same upload written by hand on node:http, jose and postgres.js: token verified with the same
 * options, the same field checks, the same ownership-checked insert, stored by `store`. It shows what
 * the layers runlane adds (Effect's HTTP server, typed errors, metrics) cost over the work itself.
 */
const handWrittenServer = (key: webcrypto.CryptoKey, store: StoreUpload): Promise<Server> =>
  serverReadingBodies(async (request, body, response) => {
    try {
      const { payload, upload } = await checkUpload(request, body, key)
      if (typeof upload.snapshotJsonl !== "string" || upload.snapshotJsonl === "" || payload["run"] !== upload.runId) {
        return answer(response, 400, "{\"error\":\"bad\"}")
      }
      const id = await store({
        runId: upload.runId,
        organizationId: payload["org"] as string,
        agentId: payload["agent"] as string,
        conversationId: payload["conv"] as string,
        snapshotJsonl: upload.snapshotJsonl,
        bytes: Buffer.byteLength(upload.snapshotJsonl),
        terminalStatus: upload.terminalStatus
      })
      answer(response, id === undefined ? 409 : 200, JSON.stringify({ id: Number(id) }))
    } catch {
      answer(response, 401, "{\"error\":\"Invalid token\"}")
    }
  })

/** Starts a server for the life of the scope; answers its port. */
const listening = (start: () => Promise<Server>) =>
  Effect.acquireRelease(
    Effect.promise(start),
    (server) => Effect.promise(() => new Promise<void>((resolve) => server.close(() => resolve())))
  ).pipe(Effect.map((server) => (server.address() as { port: number }).port))

export const httpBenchmarks = (url: string): Effect.Effect<ReadonlyArray<BenchResult>, unknown> =>
  Effect.gen(function*() {
    const runlaneServer = yield* HttpServer.HttpServer
    const address = runlaneServer.address
    if (address._tag !== "InetAddressV4") return yield* Effect.die("expected an IPv4 address")
    const runlanePort = address.port
    const barePort = yield* listening(bareServer)
    const handSql = yield* Effect.acquireRelease(
      Effect.sync(() => postgres(url, { max: 20, onnotice: () => {} })),
      (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
    )
    const key = yield* Effect.promise(() =>
      crypto.subtle.importKey("raw", new TextEncoder().encode(Redacted.value(secret)), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]))
    const handPort = yield* listening(() => handWrittenServer(key, storeOneByOne(handSql)))
    const handGroupedPort = yield* listening(() => handWrittenServer(key, storeGrouped(handSql)))
    const tokenOnlyPort = yield* listening(() => tokenCheckOnlyServer(key))
    const agent = yield* Effect.acquireRelease(
      Effect.sync(() => new Agent({ keepAlive: true, maxSockets: concurrency })),
      (agent) => Effect.sync(() => agent.destroy())
    )
    const queue = yield* RunsQueue
    const tokens = yield* WorkerTokens
    const scope = { organizationId: "bench-org", agentId: "bench-agent", conversationId: "bench-conv" }

    const uploads = (count: number, snapshotBytes: number) =>
      Effect.gen(function*() {
        const line = JSON.stringify({ type: "message", text: "x".repeat(Math.max(0, snapshotBytes - 30)) }) + "\n"
        const runs = yield* queue.sendMany(Array.from({ length: count }, () => ({ queue: "bench", ...scope, payload: {} })))
        const prepared: Array<Prepared> = []
        for (const { id } of runs) {
          const token = yield* tokens.mintRunToken(scope, id)
          const body = Buffer.from(JSON.stringify({ runId: id, terminalStatus: "completed", snapshotJsonl: line }))
          prepared.push({
            path: "/worker/transcript/snapshot",
            method: "POST",
            headers: { authorization: `Bearer ${token}`, "content-type": "application/json", "content-length": String(body.length) },
            body
          })
        }
        return prepared
      })

    const results: Array<BenchResult> = []
    const postCases = [
      { name: "snapshot POST 1 KB", bytes: 1024, perRound: 2_000, rounds: 5 },
      { name: "snapshot POST 600 KB", bytes: 600 * 1024, perRound: 40, rounds: 5 }
    ]
    for (const { name, bytes, perRound, rounds } of postCases) {
      // Warm-up on every side (JIT, connections, prepared statements): steady state is what is compared.
      for (let i = 0; i < 3; i++) {
        const warm = yield* uploads(perRound, bytes)
        yield* Effect.promise(() => throughput(agent, runlanePort, warm))
        yield* Effect.promise(() => throughput(agent, barePort, warm))
        yield* Effect.promise(() => throughput(agent, tokenOnlyPort, warm))
        const handWarm = yield* uploads(perRound, bytes)
        yield* Effect.promise(() => throughput(agent, handPort, handWarm))
        const handGroupedWarm = yield* uploads(perRound, bytes)
        yield* Effect.promise(() => throughput(agent, handGroupedPort, handGroupedWarm))
      }
      const seconds = { runlane: 0, bare: 0, hand: 0, handGrouped: 0, tokenOnly: 0 }
      const serverCpuMs = { runlane: 0, hand: 0, known: true }
      for (let round = 0; round < rounds; round++) {
        const batch = yield* uploads(perRound, bytes)
        const handBatch = yield* uploads(perRound, bytes)
        const handGroupedBatch = yield* uploads(perRound, bytes)
        const beforeRunlane = localPostgresCpuMs(url)
        seconds.runlane += perRound / (yield* Effect.promise(() => throughput(agent, runlanePort, batch)))
        const afterRunlane = localPostgresCpuMs(url)
        seconds.bare += perRound / (yield* Effect.promise(() => throughput(agent, barePort, batch)))
        seconds.tokenOnly += perRound / (yield* Effect.promise(() => throughput(agent, tokenOnlyPort, batch)))
        const beforeHand = localPostgresCpuMs(url)
        seconds.hand += perRound / (yield* Effect.promise(() => throughput(agent, handPort, handBatch)))
        const afterHand = localPostgresCpuMs(url)
        seconds.handGrouped += perRound / (yield* Effect.promise(() => throughput(agent, handGroupedPort, handGroupedBatch)))
        if (beforeRunlane !== undefined && afterRunlane !== undefined && beforeHand !== undefined && afterHand !== undefined) {
          serverCpuMs.runlane += afterRunlane - beforeRunlane
          serverCpuMs.hand += afterHand - beforeHand
        } else {
          serverCpuMs.known = false
        }
      }
      const requests = perRound * rounds
      const ours = requests / seconds.runlane
      const bareRate = requests / seconds.bare
      const handRate = requests / seconds.hand
      const tokenOnlyRate = requests / seconds.tokenOnly
      const handGroupedRate = requests / seconds.handGrouped
      results.push({
        name,
        value: ours,
        unit: "req/s",
        baseline: bareRate,
        ratio: ours / bareRate,
        note: `vs bare node:http that only reads the body; ${concurrency} in flight`
      }, {
        name: `${name}, vs hand-written`,
        value: ours,
        unit: "req/s",
        baseline: handRate,
        ratio: ours / handRate,
        note: "vs node:http + jose + postgres.js doing the same checks and insert, one statement each"
      }, {
        name: `${name}, vs hand-written grouped`,
        value: ours,
        unit: "req/s",
        baseline: handGroupedRate,
        ratio: ours / handGroupedRate,
        note: "vs the same hand-written upload storing through UploadGroups: the cost of runlane's HTTP layers"
      }, {
        name: `${name}: reference, hand-written grouped vs bare`,
        value: handGroupedRate,
        unit: "req/s",
        baseline: bareRate,
        ratio: handGroupedRate / bareRate,
        note: "the fastest complete upload here, without Effect's HTTP layers"
      }, {
        name: `${name}: reference, jose token check alone vs bare`,
        value: tokenOnlyRate,
        unit: "req/s",
        baseline: bareRate,
        ratio: tokenOnlyRate / bareRate,
        note: "node:http + jose jwtVerify + JSON.parse, nothing stored: the ceiling of any jose-checked upload"
      })
      if (serverCpuMs.known) {
        const runlaneMicros = (serverCpuMs.runlane * 1000) / requests
        const handMicros = (serverCpuMs.hand * 1000) / requests
        results.push({
          name: `${name}, PostgreSQL CPU per upload`,
          value: runlaneMicros,
          unit: "µs",
          baseline: handMicros,
          ratio: handMicros / runlaneMicros,
          note: "vs the hand-written upload (one statement each); ratio = baseline / runlane; 10 ms ticks"
        })
      }
    }

    // GET latest: sequential requests, median latency, vs a SELECT 1 round trip.
    const { runId, token } = yield* Effect.gen(function*() {
      const { id } = yield* queue.send({ queue: "bench", ...scope, conversationId: "bench-get", payload: {} })
      return { runId: id, token: yield* tokens.mintRunToken({ ...scope, conversationId: "bench-get" }, id) }
    })
    const snapshots = yield* TranscriptSnapshots
    yield* snapshots.put({ ...scope, conversationId: "bench-get" }, {
      runId,
      terminalStatus: "completed",
      snapshotJsonl: JSON.stringify({ type: "message", text: "x".repeat(1000) }) + "\n"
    })
    const getLatest: Prepared = {
      path: "/worker/transcript/snapshot",
      method: "GET",
      headers: { authorization: `Bearer ${token}` },
      body: undefined
    }
    const sql = yield* Effect.acquireRelease(
      Effect.sync(() => postgres(url, { max: 1, onnotice: () => {} })),
      (sql) => Effect.promise(() => sql.end({ timeout: 5 }))
    )
    const getTimes: Array<number> = []
    const selectTimes: Array<number> = []
    yield* Effect.promise(async () => {
      for (let i = 0; i < 300; i++) {
        await send(agent, runlanePort, getLatest)
        await sql`select 1`
      }
      for (let round = 0; round < 10; round++) {
        for (let i = 0; i < 200; i++) {
          const started = now()
          const status = await send(agent, runlanePort, getLatest)
          getTimes.push(now() - started)
          if (status !== 200) throw new Error(`GET latest answered ${status}`)
        }
        for (let i = 0; i < 200; i++) {
          const started = now()
          await sql`select 1`
          selectTimes.push(now() - started)
        }
      }
    })
    const getMedian = median(getTimes)
    const selectMedian = median(selectTimes)
    results.push({
      name: "GET latest snapshot, median",
      value: getMedian,
      unit: "ms",
      baseline: selectMedian,
      ratio: selectMedian / getMedian,
      note: "baseline: one SELECT 1 round trip from postgres.js; ratio = baseline / runlane"
    })
    return results
  }).pipe(
    Effect.scoped,
    Effect.provide(
      httpServerLayer({ port: 0, host: "127.0.0.1" }).pipe(
        Layer.provideMerge(Layer.mergeAll(
          Migrator.layer,
          ConversationLocks.layerWith({ cap: 1 }),
          RunsQueue.layer,
          RunOwnership.layer,
          TranscriptSnapshots.layer,
          WorkerTokens.layerWith({ secret })
        )),
        Layer.provideMerge(Database.layerWith({ url: Redacted.make(url), poolMax: 20 }))
      )
    )
  )
