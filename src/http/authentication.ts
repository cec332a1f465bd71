/**
 * The two bearer checks of the HTTP service: a worker token (WorkerTokens) and the operator's
 * `RUNLANE_ADMIN_TOKEN`.
 */
import { createHash, timingSafeEqual } from "node:crypto"
import { Config, Effect, Layer, Option, Redacted, Schema } from "effect"
import { WorkerTokens } from "../ownership/WorkerTokens.ts"
import { AdminAuth, BadRequest, NotFound, Unauthorized, WorkerAuth, WorkerIdentity } from "./RunlaneApi.ts"

export const adminTokenVariable = "RUNLANE_ADMIN_TOKEN"
/** Long enough that guessing is hopeless; a shorter admin token is a start-up error. */
export const minimumAdminTokenLength = 16

export class AdminTokenConfigError extends Schema.TaggedError<AdminTokenConfigError>()("AdminTokenConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}

const invalidToken = new Unauthorized({ error: "Invalid token" })
const missingScope = new BadRequest({ error: "Token missing required scope" })

export const WorkerAuthLayer = Layer.effect(
  WorkerAuth,
  Effect.gen(function*() {
    const tokens = yield* WorkerTokens
    return WorkerAuth.of({
      bearer: (httpEffect, { credential }) => {
        const token = Redacted.value(credential)
        if (token === "") return Effect.fail(invalidToken)
        return tokens.verify(token).pipe(
          Effect.mapError((error) => error.reason === "scope" ? missingScope : invalidToken),
          Effect.flatMap((verified) => Effect.provideService(httpEffect, WorkerIdentity, verified))
        )
      }
    })
  })
)

const digest = (value: string): Buffer => createHash("sha256").update(value, "utf8").digest()

/** Admin routes behind a fixed token; `undefined` turns them off (every admin route answers 404). */
export const adminAuthLayerWith = (adminToken: Redacted.Redacted<string> | undefined) =>
  Layer.succeed(AdminAuth)(AdminAuth.of({
    bearer: (httpEffect, { credential }) => {
      if (adminToken === undefined) return Effect.fail(new NotFound({ error: "Not found" }))
      // Equal-length digests compared in constant time: the answer's timing says nothing about the token.
      const matches = timingSafeEqual(digest(Redacted.value(credential)), digest(Redacted.value(adminToken)))
      return matches ? httpEffect : Effect.fail(invalidToken)
    }
  }))

/** From RUNLANE_ADMIN_TOKEN (optional; at least 16 characters when set). */
export const AdminAuthLayer = Layer.unwrap(Effect.gen(function*() {
  const configured = yield* Config.option(Config.Redacted(adminTokenVariable))
  if (Option.isNone(configured)) return adminAuthLayerWith(undefined)
  if (Redacted.value(configured.value).length < minimumAdminTokenLength) {
    return yield* new AdminTokenConfigError({
      variable: adminTokenVariable,
      message: `${adminTokenVariable} must be at least ${minimumAdminTokenLength} characters`
    })
  }
  return adminAuthLayerWith(configured.value)
}))
