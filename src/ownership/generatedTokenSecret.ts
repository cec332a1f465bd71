/**
 * The token secret `npm start` uses with its embedded database when RUNLANE_TOKEN_SECRET is not set:
 * generated once, kept in a file beside the data (readable by its owner only), so tokens minted before
 * a restart still verify after it. Meant for a developer's machine; a deployment sets the variable.
 */
import { randomBytes } from "node:crypto"
import { mkdir, readFile, writeFile } from "node:fs/promises"
import { dirname } from "node:path"
import { Effect, Redacted } from "effect"
import { minimumSecretBytes, TokenConfigError, tokenSecretVariable } from "./WorkerTokens.ts"

export const loadOrCreateTokenSecret = (file: string): Effect.Effect<Redacted.Redacted<string>, TokenConfigError> =>
  Effect.tryPromise({
    try: async () => {
      const existing = await readFile(file, "utf8").catch((error: NodeJS.ErrnoException) => {
        if (error.code === "ENOENT") return undefined
        throw error
      })
      if (existing !== undefined) return { secret: existing.trim(), created: false }
      await mkdir(dirname(file), { recursive: true })
      const secret = randomBytes(minimumSecretBytes).toString("base64url")
      // "wx": if two starts race, one writes and the other fails and reads the winner's secret next time.
      await writeFile(file, `${secret}\n`, { mode: 0o600, flag: "wx" })
      return { secret, created: true }
    },
    catch: (cause) =>
      new TokenConfigError({
        variable: tokenSecretVariable,
        message: `${tokenSecretVariable} is not set and ${file} could not be used: ${String(cause)}`
      })
  }).pipe(
    Effect.tap(({ created }) =>
      Effect.logWarning(
        `${tokenSecretVariable} is not set: using the ${created ? "newly generated" : "generated"} secret in ${file}. ` +
          `Set ${tokenSecretVariable} (at least ${minimumSecretBytes} bytes) for anything but local development.`
      )
    ),
    Effect.map(({ secret }) => Redacted.make(secret))
  )
