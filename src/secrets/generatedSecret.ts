/**
 * A random secret generated once and kept in a file readable by its owner only (mode 600), so a
 * restart finds the same one: the embedded server's superuser password and, without
 * RUNLANE_TOKEN_SECRET, the token secret. The secret itself is never logged.
 */
import { randomBytes } from "node:crypto"
import { mkdir, open, readFile, rename, unlink } from "node:fs/promises"
import { dirname } from "node:path"

export interface GeneratedSecret {
  readonly secret: string
  /** "created": there was no file; "replaced": the file was empty (a crash while writing it, before writes were atomic). */
  readonly origin: "existing" | "created" | "replaced"
}

/**
 * Writes through a temporary file in the same folder, synced before it is renamed over `file`, so a
 * crash at any point leaves either no file or a whole one, never an empty or partial secret.
 */
const writeAtomically = async (file: string, contents: string): Promise<void> => {
  const temporary = `${file}.${randomBytes(6).toString("hex")}.tmp`
  const handle = await open(temporary, "wx", 0o600)
  try {
    await handle.writeFile(contents, "utf8")
    await handle.sync()
  } finally {
    await handle.close()
  }
  try {
    await rename(temporary, file)
  } catch (error) {
    await unlink(temporary).catch(() => undefined)
    throw error
  }
}

/** The secret in `file`, or a new one of `bytes` random bytes (base64url) written there first. */
export const loadOrCreateSecret = async (file: string, bytes: number): Promise<GeneratedSecret> => {
  const existing = await readFile(file, "utf8").catch((error: NodeJS.ErrnoException) => {
    if (error.code === "ENOENT") return undefined
    throw error
  })
  const trimmed = existing?.trim()
  if (trimmed !== undefined && trimmed !== "") return { secret: trimmed, origin: "existing" }
  await mkdir(dirname(file), { recursive: true })
  const secret = randomBytes(bytes).toString("base64url")
  await writeAtomically(file, `${secret}\n`)
  return { secret, origin: existing === undefined ? "created" : "replaced" }
}
