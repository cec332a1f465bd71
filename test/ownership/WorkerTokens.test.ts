import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit, Redacted } from "effect"
import { SignJWT, UnsecuredJWT } from "jose"
import { InvalidToken, TokenConfigError, WorkerTokens } from "../../src/ownership/WorkerTokens.ts"

const secret = "a-test-secret-that-is-long-enough-for-hs256!"
const secretBytes = new TextEncoder().encode(secret)
const scope = { organizationId: "org-a", agentId: "agent-x", conversationId: "telegram:6570514069" }
const TestLayer = WorkerTokens.layerWith({ secret: Redacted.make(secret) })

const now = () => Math.floor(Date.now() / 1000)
/** A token signed with the right secret, its claims and header chosen by the test. */
const forge = (claims: Record<string, unknown>, alg = "HS256") =>
  Effect.promise(() =>
    new SignJWT({ org: scope.organizationId, agent: scope.agentId, conv: scope.conversationId, ...claims })
      .setProtectedHeader({ alg })
      .setIssuer("runlane")
      .setAudience("runlane-worker")
      .setJti("jti-1")
      .setIssuedAt()
      .setNotBefore(now() - 1)
      .setExpirationTime(now() + 600)
      .sign(secretBytes))

const reasonOf = (token: string) =>
  Effect.gen(function*() {
    const tokens = yield* WorkerTokens
    const error = yield* Effect.flip(tokens.verify(token))
    assert.instanceOf(error, InvalidToken)
    return error.reason
  })

describe("WorkerTokens", () => {
  it.effect("a run token verifies to its scope and run; a deployment token has no run", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const run = yield* tokens.verify(yield* tokens.mintRunToken(scope, 42))
      assert.deepStrictEqual(run.scope, scope)
      assert.strictEqual(run.kind, "run")
      assert.strictEqual(run.runId, 42)
      assert.isAbove(run.tokenId.length, 0)
      const deployment = yield* tokens.verify(yield* tokens.mintDeploymentToken(scope))
      assert.strictEqual(deployment.kind, "deployment")
      assert.isUndefined(deployment.runId)
    }).pipe(Effect.provide(TestLayer)))

  it.effect("refuses a tampered signature, alg none, another algorithm, and garbage", () =>
    Effect.gen(function*() {
      const tokens = yield* WorkerTokens
      const good = yield* tokens.mintRunToken(scope, 42)
      const [header, payload, signature] = good.split(".")
      const otherPayload = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(payload!, "base64url").toString()), run: 43 })).toString("base64url")
      assert.strictEqual(yield* reasonOf(`${header}.${otherPayload}.${signature}`), "signature")
      const unsecured = new UnsecuredJWT({ org: "org-a", agent: "agent-x", conv: "c", run: 42, jti: "x" })
        .setIssuer("runlane").setAudience("runlane-worker").setIssuedAt().setNotBefore(now() - 1).setExpirationTime(now() + 600).encode()
      assert.include(["algorithm", "malformed"], yield* reasonOf(unsecured))
      assert.strictEqual(yield* reasonOf(yield* forge({ run: 42 }, "HS512")), "algorithm")
      assert.strictEqual(yield* reasonOf("not.a.jwt"), "malformed")
      assert.strictEqual(yield* reasonOf(""), "malformed")
    }).pipe(Effect.provide(TestLayer)))

  it.effect("refuses expired tokens and tokens from the future, beyond the skew", () =>
    Effect.gen(function*() {
      assert.strictEqual(yield* reasonOf(yield* Effect.promise(() =>
        new SignJWT({ org: "o", agent: "a", conv: "c" }).setProtectedHeader({ alg: "HS256" }).setIssuer("runlane")
          .setAudience("runlane-worker").setJti("j").setIssuedAt(now() - 7200).setNotBefore(now() - 7200)
          .setExpirationTime(now() - 60).sign(secretBytes))), "expired")
      assert.strictEqual(yield* reasonOf(yield* Effect.promise(() =>
        new SignJWT({ org: "o", agent: "a", conv: "c" }).setProtectedHeader({ alg: "HS256" }).setIssuer("runlane")
          .setAudience("runlane-worker").setJti("j").setIssuedAt().setNotBefore(now() + 3600)
          .setExpirationTime(now() + 7200).sign(secretBytes))), "not yet valid")
      // Within the 30 s skew, a slightly fast clock is accepted.
      const tokens = yield* WorkerTokens
      const nearFuture = yield* Effect.promise(() =>
        new SignJWT({ org: "o", agent: "a", conv: "c" }).setProtectedHeader({ alg: "HS256" }).setIssuer("runlane")
          .setAudience("runlane-worker").setJti("j").setIssuedAt().setNotBefore(now() + 10)
          .setExpirationTime(now() + 600).sign(secretBytes))
      assert.strictEqual((yield* tokens.verify(nearFuture)).scope.organizationId, "o")
    }).pipe(Effect.provide(TestLayer)))

  it.effect("requires every scope claim, a token id, and a positive integer run", () =>
    Effect.gen(function*() {
      assert.strictEqual(yield* reasonOf(yield* forge({ conv: undefined })), "scope")
      assert.strictEqual(yield* reasonOf(yield* forge({ org: "" })), "scope")
      assert.strictEqual(yield* reasonOf(yield* forge({ run: "42" })), "claims")
      assert.strictEqual(yield* reasonOf(yield* forge({ run: 0 })), "claims")
      assert.strictEqual(yield* reasonOf(yield* forge({ run: 1.5 })), "claims")
    }).pipe(Effect.provide(TestLayer)))

  it.effect("a secret shorter than 32 bytes is a start-up error naming the variable", () =>
    Effect.gen(function*() {
      const exit = yield* Effect.exit(Effect.gen(function*() {
        yield* WorkerTokens
      }).pipe(Effect.provide(WorkerTokens.layerWith({ secret: Redacted.make("short") }))))
      assert.isTrue(Exit.isFailure(exit))
      const reason = Exit.isFailure(exit) ? exit.cause.reasons.find((r) => r._tag === "Fail") : undefined
      const error = (reason as { error: TokenConfigError }).error
      assert.instanceOf(error, TokenConfigError)
      assert.strictEqual(error.variable, "RUNLANE_TOKEN_SECRET")
    }))
})
