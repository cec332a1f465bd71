/**
 * The HTTP service on an ephemeral port of 127.0.0.1, over a test database, and a small client for it.
 * Requests go over real TCP (Node's fetch), so the server is exercised as a worker would call it.
 */
import { ConfigProvider, Context, Effect, Layer, Redacted } from "effect"
import { HttpServer } from "effect/http"
import { SignJWT } from "jose"
import { Migrator } from "../../src/db/Migrator.ts"
import { httpServerLayer } from "../../src/http/server.ts"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { RunOwnership } from "../../src/ownership/RunOwnership.ts"
import { WorkerTokens } from "../../src/ownership/WorkerTokens.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { TranscriptSnapshots } from "../../src/snapshots/TranscriptSnapshots.ts"
import { testDatabaseLayer } from "./testDatabase.ts"

export const adminToken = "test-admin-token-0123456789"
export const tokenSecret = "a-test-secret-that-is-at-least-32-bytes-long"
export const secretBytes = new TextEncoder().encode(tokenSecret)

/** The services the routes need, over a fresh migrated database. */
export const routeServicesLayer = (options: { readonly lockCap?: number } = {}) =>
  Layer.mergeAll(
    Migrator.layer,
    ConversationLocks.layerWith({ cap: options.lockCap ?? 3 }),
    RunsQueue.layer,
    RunOwnership.layer,
    TranscriptSnapshots.layer,
    WorkerTokens.layerWith({ secret: Redacted.make(tokenSecret) })
  ).pipe(Layer.provideMerge(testDatabaseLayer({ poolMax: 10 })))

export class TestServer extends Context.Service<TestServer, { readonly baseUrl: string; readonly port: number }>()(
  "test/TestServer"
) {}

const testServerAddress = Layer.effect(
  TestServer,
  Effect.map(HttpServer.HttpServer, (server) => {
    const address = server.address
    if (address._tag !== "InetAddressV4") throw new Error("expected an IPv4 address")
    return { baseUrl: `http://127.0.0.1:${address.port}`, port: address.port }
  })
)

/**
 * The real server on port 0, with the admin routes on unless `adminToken` is null; `env` is the rest
 * of the environment the services read (e.g. RUNLANE_UPLOAD_QUEUE_MAX).
 */
export const testServerLayer = (
  options: {
    readonly adminToken?: string | null
    readonly lockCap?: number
    readonly env?: Record<string, string>
  } = {}
) => {
  const admin = options.adminToken === undefined ? adminToken : options.adminToken
  const env = { ...options.env, ...(admin === null ? {} : { RUNLANE_ADMIN_TOKEN: admin }) }
  return testServerAddress.pipe(
    Layer.provideMerge(httpServerLayer({ port: 0, host: "127.0.0.1" })),
    Layer.provideMerge(routeServicesLayer(options.lockCap === undefined ? {} : { lockCap: options.lockCap })),
    Layer.provide(ConfigProvider.layer(ConfigProvider.fromEnvRecord(env)))
  )
}

export interface Answer {
  readonly status: number
  readonly contentType: string | null
  readonly text: string
  readonly json: unknown
}

export interface CallOptions {
  readonly token?: string
  readonly body?: unknown
  /** Sent as is, not JSON-encoded. */
  readonly rawBody?: string | Uint8Array
  readonly headers?: Record<string, string>
}

export const call = (method: string, path: string, options: CallOptions = {}) =>
  Effect.flatMap(TestServer, ({ baseUrl }) =>
    Effect.promise(async (): Promise<Answer> => {
      const headers: Record<string, string> = { ...options.headers }
      if (options.token !== undefined) headers["authorization"] = `Bearer ${options.token}`
      // fetch refuses a body on GET; the routes ignore one there anyway.
      const body = method === "GET"
        ? undefined
        : options.rawBody ?? (options.body === undefined ? undefined : JSON.stringify(options.body))
      if (body !== undefined) headers["content-type"] ??= "application/json"
      const response = await fetch(`${baseUrl}${path}`, { method, headers, ...(body === undefined ? {} : { body }) })
      const text = await response.text()
      let json: unknown = undefined
      try {
        json = JSON.parse(text)
      } catch {
        json = undefined
      }
      return { status: response.status, contentType: response.headers.get("content-type"), text, json }
    }))

export interface Scope {
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
}

/** A worker token signed with the test secret; `claims` override or (as undefined) remove claims. */
export const forgeToken = (
  claims: Record<string, unknown>,
  options: { readonly expiresIn?: number; readonly notBefore?: number; readonly alg?: string } = {}
) =>
  Effect.promise(() => {
    const now = Math.floor(Date.now() / 1000)
    const payload: Record<string, unknown> = {
      iss: "runlane",
      aud: "runlane-worker",
      jti: "test-jti",
      iat: now,
      nbf: options.notBefore ?? now,
      exp: now + (options.expiresIn ?? 600),
      ...claims
    }
    for (const key of Object.keys(payload)) if (payload[key] === undefined) delete payload[key]
    return new SignJWT(payload).setProtectedHeader({ alg: options.alg ?? "HS256", typ: "JWT" }).sign(secretBytes)
  })

/** An unsigned token (`alg: none`), which must never verify. */
export const unsignedToken = (claims: Record<string, unknown>): string => {
  const encode = (value: unknown) => Buffer.from(JSON.stringify(value)).toString("base64url")
  const now = Math.floor(Date.now() / 1000)
  return `${encode({ alg: "none", typ: "JWT" })}.${
    encode({ iss: "runlane", aud: "runlane-worker", jti: "j", iat: now, nbf: now, exp: now + 600, ...claims })
  }.`
}

/** A run in the given scope, enqueued through the service, and its run token. */
export const runWithToken = (scope: Scope) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    const tokens = yield* WorkerTokens
    const { id } = yield* queue.send({ queue: "messages", ...scope, payload: { text: "hello" } })
    return { runId: id, token: yield* tokens.mintRunToken(scope, id) }
  })
