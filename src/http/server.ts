/**
 * The routes of RunlaneApi with their handlers, served by Node (`httpServerLayer`) or as a web
 * `fetch` handler to mount in another framework (`makeFetchHandler`).
 */
import { createServer, type Server } from "node:http"
import { NodeHttpServer } from "@effect/platform-node"
import { Duration, Effect, Layer, Redacted, Schema } from "effect"
import { HttpRouter, HttpServer, HttpServerResponse } from "effect/http"
import { HttpApiBuilder, OpenApi } from "effect/http-api"
import type { Database } from "../db/Database.ts"
import type { Migrator } from "../db/Migrator.ts"
import type { ConversationLocks } from "../locks/ConversationLocks.ts"
import type { RunOwnership } from "../ownership/RunOwnership.ts"
import type { WorkerTokens } from "../ownership/WorkerTokens.ts"
import type { RunsQueue } from "../runs/RunsQueue.ts"
import type { TranscriptSnapshots } from "../snapshots/TranscriptSnapshots.ts"
import { AdminHandlers } from "./adminHandlers.ts"
import {
  AdminAuthLayer,
  adminAuthLayerWith,
  AdminTokenConfigError,
  minimumAdminTokenLength,
  WorkerAuthLayer
} from "./authentication.ts"
import { HealthHandlers } from "./healthHandlers.ts"
import { HttpMetricsMiddleware } from "./httpMetrics.ts"
import { type AdminAuth, RunlaneApi, ServedApi } from "./RunlaneApi.ts"
import { SnapshotHandlers } from "./snapshotHandlers.ts"
import { SnapshotUploadRoute } from "./snapshotUpload.ts"

/** The services the routes stand on. */
export type RouteServices =
  | Database
  | Migrator
  | ConversationLocks
  | RunsQueue
  | RunOwnership
  | WorkerTokens
  | TranscriptSnapshots

/** How long in-flight requests may finish after shutdown begins before their connections are cut. */
export const shutdownGraceMs = 10_000
/** A request (headers and body) must arrive within this; a client trickling bytes is cut off. */
export const requestTimeoutMs = 120_000

const notFound = HttpRouter.add("*", "*", HttpServerResponse.jsonUnsafe({ error: "Not found" }, { status: 404 }))

/**
 * The whole RunlaneApi document, as HttpApiBuilder's `openapiPath` would serve it (made at the first
 * request, then reused): HttpApiBuilder serves ServedApi, which lacks the upload.
 */
let openApiDocument: HttpServerResponse.HttpServerResponse | undefined
const openApi = HttpRouter.add(
  "GET",
  "/openapi.json",
  Effect.sync(() => openApiDocument ??= HttpServerResponse.jsonUnsafe(OpenApi.fromApi(RunlaneApi)))
)

/** Every route, including /openapi.json, answering JSON 404 for anything else; admin auth as given. */
const routesWith = <E>(adminAuth: Layer.Layer<AdminAuth, E>) =>
  Layer.mergeAll(
    HttpApiBuilder.layer(ServedApi),
    SnapshotUploadRoute,
    openApi,
    notFound,
    HttpMetricsMiddleware
  ).pipe(
    Layer.provide([SnapshotHandlers, HealthHandlers, AdminHandlers]),
    Layer.provide([WorkerAuthLayer, adminAuth])
  )

/** Every route, with the admin token from RUNLANE_ADMIN_TOKEN. */
export const RunlaneRoutes = routesWith(AdminAuthLayer)

export class HttpListenError extends Schema.TaggedError<HttpListenError>()("HttpListenError", {
  port: Schema.Number,
  host: Schema.String,
  message: Schema.String
}) {}

export interface HttpServerOptions {
  readonly port: number
  readonly host: string
}

/**
 * Serves the routes on Node. On close: stop accepting, give in-flight requests `shutdownGraceMs` to
 * finish, then cut the connections still open; the services the routes use close after that.
 */
export const httpServerLayer = (options: HttpServerOptions) => {
  let server: Server | undefined
  const listening = NodeHttpServer.make(() => {
    server = createServer({ requestTimeout: requestTimeoutMs })
    return server
  }, { port: options.port, host: options.host, gracefulShutdownTimeout: Duration.millis(shutdownGraceMs) }).pipe(
    Effect.catchTag("ServeError", (error) =>
      Effect.fail(
        new HttpListenError({
          port: options.port,
          host: options.host,
          message: (error.cause as NodeJS.ErrnoException | undefined)?.code === "EADDRINUSE"
            ? `port ${options.port} on ${options.host} is in use; is runlane already running? Set PORT to another port`
            : `could not listen on ${options.host}:${options.port}: ${String(error.cause)}`
        })
      ))
  )
  const nodeServer = Layer.merge(Layer.effect(HttpServer.HttpServer)(listening), NodeHttpServer.layerHttpServices)

  // Built after the server, so its finalizer runs before the server's own close.
  const boundedShutdown = Layer.effectDiscard(Effect.addFinalizer(() => drain(server)))

  return boundedShutdown.pipe(
    Layer.provideMerge(
      HttpRouter.serve(RunlaneRoutes, { disableLogger: true, disableListenLog: true })
    ),
    Layer.provideMerge(nodeServer)
  )
}

const openConnections = (server: Server): Promise<number> =>
  new Promise((resolve) => server.getConnections((error, count) => resolve(error ? 0 : count)))

const drain = (server: Server | undefined) =>
  Effect.promise(async () => {
    if (server === undefined || !server.listening) return undefined
    server.close()
    server.closeIdleConnections()
    const deadline = Date.now() + shutdownGraceMs
    while (Date.now() < deadline && (await openConnections(server)) > 0) {
      await new Promise((resolve) => setTimeout(resolve, 25))
      server.closeIdleConnections()
    }
    const cut = await openConnections(server)
    server.closeAllConnections()
    return cut
  }).pipe(
    Effect.flatMap((cut) =>
      Effect.logInfo(
        cut === undefined || cut === 0
          ? "HTTP server stopped"
          : `HTTP server stopped; ${cut} connection(s) still busy after ${shutdownGraceMs} ms were cut`
      )
    )
  )

export interface FetchHandlerOptions {
  /**
   * The admin routes' bearer token; `undefined` turns them off (404). Omitted: RUNLANE_ADMIN_TOKEN,
   * as in the service. At least 16 characters, as RUNLANE_ADMIN_TOKEN: an empty token would match a
   * request with no Authorization header at all.
   */
  readonly adminToken?: Redacted.Redacted<string> | undefined
}

/**
 * The routes as a web `fetch` handler (`(request: Request) => Promise<Response>`), for mounting in
 * another framework. `services` supplies what the routes stand on; call `dispose` when done.
 * Throws `AdminTokenConfigError` for an `adminToken` under 16 characters.
 */
export const makeFetchHandler = <E>(services: Layer.Layer<RouteServices, E>, options: FetchHandlerOptions = {}) => {
  if (options.adminToken !== undefined && Redacted.value(options.adminToken).length < minimumAdminTokenLength) {
    throw new AdminTokenConfigError({
      variable: "adminToken",
      message: `adminToken must be at least ${minimumAdminTokenLength} characters`
    })
  }
  return HttpRouter.toWebHandler(
    routesWith("adminToken" in options ? adminAuthLayerWith(options.adminToken) : AdminAuthLayer).pipe(
      Layer.provide(services),
      Layer.provide(HttpServer.layerServices)
    ),
    { disableLogger: true }
  )
}
