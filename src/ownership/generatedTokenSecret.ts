/**
 * The token secret `npm start` uses with its embedded database when RUNLANE_TOKEN_SECRET is not set:
 * generated once, kept in a file beside the data (readable by its owner only), so tokens minted before
 * a restart still verify after it. Meant for a developer's machine; a deployment sets the variable.
 */
import { Effect, Redacted } from "effect"
import { loadOrCreateSecret } from "../secrets/generatedSecret.ts"
import { minimumSecretBytes, TokenConfigError, tokenSecretVariable } from "./WorkerTokens.ts"

export const loadOrCreateTokenSecret = (file: string): Effect.Effect<Redacted.Redacted<string>, TokenConfigError> =>
  Effect.tryPromise({
    try: () => loadOrCreateSecret(file, minimumSecretBytes),
    catch: (cause) =>
      new TokenConfigError({
        variable: tokenSecretVariable,
        message: `${tokenSecretVariable} is not set and ${file} could not be used: ${String(cause)}`
      })
  }).pipe(
    Effect.tap(({ origin }) =>
      Effect.logWarning(
        `${tokenSecretVariable} is not set: using the ${origin === "existing" ? "generated" : "newly generated"} ` +
          `secret in ${file}${origin === "replaced" ? " (it was empty)" : ""}. ` +
          `Set ${tokenSecretVariable} (at least ${minimumSecretBytes} bytes) for anything but local development.`
      )
    ),
    Effect.map(({ secret }) => Redacted.make(secret))
  )
