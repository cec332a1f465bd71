/**
 * WorkerTokens: the JWTs a worker presents (jose, HS256).
 *
 * A run token names organization, agent, conversation and the run it may upload for; a deployment
 * token names the conversation only (hydrate and reset). Verification pins the algorithm (so `alg: none`
 * and algorithm confusion are refused), checks expiry and not-before with a small clock skew, and
 * requires every scope claim and a token id. No hand-rolled crypto.
 */
import { randomUUID } from "node:crypto"
import { Config, Context, Effect, Layer, Option, Predicate, Redacted, Schema } from "effect"
import { errors as joseErrors, jwtVerify, SignJWT } from "jose"

export const tokenSecretVariable = "RUNLANE_TOKEN_SECRET"
/** HS256 wants a key at least as long as its output. */
export const minimumSecretBytes = 32
const algorithm = "HS256"
const issuer = "runlane"
const audience = "runlane-worker"

export const defaults = {
  /** A run can take a long turn; the reference system's 2 h default lost snapshots of longer turns. */
  ttlSeconds: 4 * 60 * 60,
  clockSkewSeconds: 30
} as const

export class InvalidToken extends Schema.TaggedError<InvalidToken>()("InvalidToken", {
  /** `scope`: the signature is good but an organization, agent or conversation claim is missing or empty. */
  reason: Schema.Literals(["malformed", "signature", "algorithm", "expired", "not yet valid", "claims", "scope"]),
  message: Schema.String
}) {}

export class TokenConfigError extends Schema.TaggedError<TokenConfigError>()("TokenConfigError", {
  variable: Schema.String,
  message: Schema.String
}) {}

export interface TokenScope {
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
}

export interface VerifiedToken {
  readonly kind: "run" | "deployment"
  readonly scope: TokenScope
  /** Present on run tokens only. */
  readonly runId: number | undefined
  readonly tokenId: string
  /** Epoch seconds. */
  readonly expiresAt: number
}

export interface WorkerTokensOptions {
  readonly secret: Redacted.Redacted<string>
  readonly ttlSeconds?: number
  readonly clockSkewSeconds?: number
}

export class WorkerTokens extends Context.Service<WorkerTokens, {
  readonly mintRunToken: (scope: TokenScope, runId: number) => Effect.Effect<string>
  readonly mintDeploymentToken: (scope: TokenScope) => Effect.Effect<string>
  readonly verify: (token: string) => Effect.Effect<VerifiedToken, InvalidToken>
}>()("runlane/WorkerTokens") {
  static readonly layerWith = (options: WorkerTokensOptions) => Layer.effect(WorkerTokens, make(options))

  /** From RUNLANE_TOKEN_SECRET (required, at least 32 bytes). */
  static readonly layer = Layer.effect(
    WorkerTokens,
    Effect.gen(function*() {
      const secret = yield* Config.option(Config.Redacted(tokenSecretVariable))
      if (Option.isNone(secret)) {
        return yield* new TokenConfigError({ variable: tokenSecretVariable, message: `${tokenSecretVariable} is not set` })
      }
      return yield* make({ secret: secret.value })
    })
  )
}

const make = Effect.fnUntraced(function*(options: WorkerTokensOptions) {
  const secretBytes = new TextEncoder().encode(Redacted.value(options.secret))
  if (secretBytes.length < minimumSecretBytes) {
    return yield* new TokenConfigError({
      variable: tokenSecretVariable,
      message: `${tokenSecretVariable} must be at least ${minimumSecretBytes} bytes, got ${secretBytes.length}`
    })
  }
  // Imported once: handing jose the raw bytes makes it import the key again on every sign and verify,
  // which measured about a tenth of a snapshot upload's CPU (npm run bench).
  const key = yield* Effect.promise(() =>
    crypto.subtle.importKey("raw", secretBytes, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]))
  const ttlSeconds = options.ttlSeconds ?? defaults.ttlSeconds
  const clockSkewSeconds = options.clockSkewSeconds ?? defaults.clockSkewSeconds

  const mint = (scope: TokenScope, runId: number | undefined) =>
    Effect.promise(() =>
      new SignJWT({
        org: scope.organizationId,
        agent: scope.agentId,
        conv: scope.conversationId,
        ...(runId === undefined ? {} : { run: runId })
      })
        .setProtectedHeader({ alg: algorithm, typ: "JWT" })
        .setIssuer(issuer)
        .setAudience(audience)
        .setJti(randomUUID())
        .setIssuedAt()
        .setNotBefore("0s")
        .setExpirationTime(`${ttlSeconds}s`)
        .sign(key)
    )

  const verify = (token: string) =>
    Effect.tryPromise({
      try: () =>
        jwtVerify(token, key, {
          algorithms: [algorithm],
          issuer,
          audience,
          clockTolerance: clockSkewSeconds,
          requiredClaims: ["exp", "nbf", "iat", "jti", "org", "agent", "conv"]
        }),
      catch: toInvalidToken
    }).pipe(
      Effect.flatMap(({ payload }) => {
        const { org, agent, conv, run, jti, exp } = payload as Record<string, unknown>
        if (![org, agent, conv].every((id) => Predicate.isString(id) && id.length > 0)) {
          return Effect.fail(new InvalidToken({ reason: "scope", message: "an organization, agent or conversation claim is missing or empty" }))
        }
        if (!Predicate.isString(jti) || jti === "") {
          return Effect.fail(new InvalidToken({ reason: "claims", message: "the token id is missing or empty" }))
        }
        if (run !== undefined && !(Number.isSafeInteger(run) && (run as number) > 0)) {
          return Effect.fail(new InvalidToken({ reason: "claims", message: "the run claim is not a positive integer" }))
        }
        return Effect.succeed<VerifiedToken>({
          kind: run === undefined ? "deployment" : "run",
          scope: { organizationId: org as string, agentId: agent as string, conversationId: conv as string },
          runId: run as number | undefined,
          tokenId: jti,
          expiresAt: exp as number
        })
      })
    )

  return WorkerTokens.of({
    mintRunToken: (scope, runId) => mint(scope, runId),
    mintDeploymentToken: (scope) => mint(scope, undefined),
    verify
  })
})

const scopeClaims: ReadonlySet<string> = new Set(["org", "agent", "conv"])

const toInvalidToken = (cause: unknown): InvalidToken => {
  if (cause instanceof joseErrors.JWTExpired) return new InvalidToken({ reason: "expired", message: "the token has expired" })
  if (cause instanceof joseErrors.JWTClaimValidationFailed) {
    if (cause.claim === "nbf" || cause.claim === "iat") {
      return new InvalidToken({ reason: "not yet valid", message: "the token is not valid yet" })
    }
    return scopeClaims.has(cause.claim)
      ? new InvalidToken({ reason: "scope", message: `claim ${cause.claim}: ${cause.reason}` })
      : new InvalidToken({ reason: "claims", message: `claim ${cause.claim}: ${cause.reason}` })
  }
  if (cause instanceof joseErrors.JOSEAlgNotAllowed) {
    return new InvalidToken({ reason: "algorithm", message: "the token's algorithm is not accepted" })
  }
  if (cause instanceof joseErrors.JWSSignatureVerificationFailed) {
    return new InvalidToken({ reason: "signature", message: "the signature does not verify" })
  }
  return new InvalidToken({ reason: "malformed", message: "the token is not a well-formed JWT" })
}
