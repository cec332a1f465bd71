/**
 * Validation of what a producer hands to `RunsQueue.send`, before anything reaches the database.
 *
 * Pure: no service, no I/O. Every rejection names the field (with the run's index in a batch and the
 * path inside the payload), so the caller can fix its input; nothing is written when any run is invalid.
 */
import { Schema } from "effect"
import type { JsonObject } from "../schema/runs.ts"

export class InvalidRunInput extends Schema.TaggedError<InvalidRunInput>()("InvalidRunInput", {
  /** The offending field, e.g. "queue" or "payload.items[2].name". */
  field: Schema.String,
  message: Schema.String,
  /** Position of the run in a `sendMany` batch. */
  index: Schema.optional(Schema.Number)
}) {}

export interface SendRunInput {
  /** Queue name: 1-128 of letters, digits, and `_ . : -`, starting with a letter or digit. */
  readonly queue: string
  readonly organizationId: string
  readonly agentId?: string | undefined
  readonly conversationId?: string | undefined
  /** A plain JSON object (a null-prototype object is fine); stored as a jsonb object. */
  readonly payload: JsonObject
  /** Higher runs first. A whole number from -1,000,000 to 1,000,000. Defaults to 0. */
  readonly priority?: number | undefined
  /** Not claimable before now + delayMs (database clock). Excludes `runAt`. */
  readonly delayMs?: number | undefined
  /** Not claimable before this instant. Excludes `delayMs`. */
  readonly runAt?: Date | undefined
  /** Never claimed after this instant. */
  readonly expiresAt?: Date | undefined
  /** Total executions allowed, first one included. 1 to 1,000. Defaults to 3. */
  readonly maxAttempts?: number | undefined
  /** Fixed delay between attempts, 0 to 604,800 s (a week). Omitted: exponential backoff. */
  readonly retryDelaySeconds?: number | undefined
  /** Dedupes against runs of the same organization that are still pending or claimed. 1-512 characters. */
  readonly idempotencyKey?: string | undefined
}

/** A validated run, shaped as the insert statement's columns. */
export interface RunRecord {
  readonly queue: string
  readonly organization_id: string
  readonly agent_id: string | null
  readonly conversation_id: string | null
  /** The payload as JSON text, encoded exactly once; the server casts it to jsonb. */
  readonly action_input_json: string
  readonly priority: number
  readonly delay_ms: number | null
  readonly run_at: string | null
  readonly expires_at: string | null
  readonly max_attempts: number
  readonly retry_delay_seconds: number | null
  readonly idempotency_key: string | null
}

/** Matches the column default of runs.max_attempts. */
export const defaultMaxAttempts = 3

export const limits = {
  idLength: 256,
  idempotencyKeyLength: 512,
  priority: 1_000_000,
  maxAttempts: 1_000,
  retryDelaySeconds: 604_800,
  // A year: a longer delay is almost certainly a unit mistake (seconds passed as milliseconds the other way round).
  delayMs: 31_536_000_000,
  // PostgreSQL's jsonb parser recurses per level; 100 is far beyond any real payload and far below its stack limit.
  payloadDepth: 100
} as const

const queuePattern = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$/
// PostgreSQL text and jsonb cannot hold U+0000, and a lone surrogate has no UTF-8 form (it would be
// silently replaced), so both are refused rather than stored differently from what was sent.
const unstorable = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

const describeUnstorable = (value: string): string | undefined => {
  const match = unstorable.exec(value)
  if (match === null) return undefined
  return match[0] === "\u0000"
    ? "contains the character U+0000, which PostgreSQL cannot store"
    : "contains a lone UTF-16 surrogate, which is not valid Unicode"
}

type Check = { readonly field: string; readonly message: string }

const checkId = (field: string, value: unknown, maxLength: number): Check | undefined => {
  if (typeof value !== "string") return { field, message: "must be a string" }
  if (value.length === 0) return { field, message: "must not be empty" }
  if (value.length > maxLength) return { field, message: `must be at most ${maxLength} characters` }
  const bad = describeUnstorable(value)
  return bad === undefined ? undefined : { field, message: bad }
}

const checkOptionalId = (field: string, value: unknown, maxLength: number): Check | undefined =>
  value === undefined ? undefined : checkId(field, value, maxLength)

const checkInteger = (field: string, value: unknown, min: number, max: number): Check | undefined => {
  if (value === undefined) return undefined
  if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
    return { field, message: `must be a whole number from ${min} to ${max}` }
  }
  return undefined
}

const checkDate = (field: string, value: unknown): Check | undefined => {
  if (value === undefined) return undefined
  if (!(value instanceof Date) || Number.isNaN(value.getTime())) return { field, message: "must be a valid Date" }
  return undefined
}

const isPlainObject = (value: object): boolean => {
  const prototype = Object.getPrototypeOf(value)
  return prototype === Object.prototype || prototype === null
}

const typeName = (value: unknown): string =>
  value === null ? "null" : typeof value === "object" ? (value.constructor?.name ?? "object") : typeof value

/** Walks a payload and reports the first value JSON cannot carry exactly, with its path. */
const checkJson = (path: string, value: unknown, depth: number, ancestors: Set<object>): Check | undefined => {
  switch (typeof value) {
    case "string": {
      const bad = describeUnstorable(value)
      return bad === undefined ? undefined : { field: path, message: bad }
    }
    case "number":
      if (!Number.isFinite(value)) return { field: path, message: `is ${value}, which JSON cannot carry` }
      // Beyond 2^53 - 1 a number is no longer exact: JSON.parse has already rounded
      // 12345678901234567891 to 12345678901234567000 before we see it, silently. Refused rather than
      // stored differently from what was sent, for library callers too (one rule for both doors).
      return Math.abs(value) <= Number.MAX_SAFE_INTEGER ? undefined : {
        field: path,
        message: `is beyond ±(2^53 - 1) = ${Number.MAX_SAFE_INTEGER}, where a JSON number is not exact; send it as a string`
      }
    case "boolean":
      return undefined
    case "object": {
      if (value === null) return undefined
      if (depth > limits.payloadDepth) return { field: path, message: `nests deeper than ${limits.payloadDepth} levels` }
      if (ancestors.has(value)) return { field: path, message: "refers back to itself (a cycle)" }
      ancestors.add(value)
      try {
        if (Array.isArray(value)) {
          for (let i = 0; i < value.length; i++) {
            const bad = checkJson(`${path}[${i}]`, value[i], depth + 1, ancestors)
            if (bad) return bad
          }
          return undefined
        }
        if (!isPlainObject(value)) {
          return { field: path, message: `is a ${typeName(value)}, not a plain JSON object` }
        }
        if (Object.getOwnPropertySymbols(value).length > 0) {
          return { field: path, message: "has symbol keys, which JSON cannot carry" }
        }
        for (const key of Object.keys(value)) {
          const badKey = describeUnstorable(key)
          if (badKey) return { field: `${path}[${JSON.stringify(key)}]`, message: `key ${badKey}` }
          const bad = checkJson(`${path}.${key}`, (value as Record<string, unknown>)[key], depth + 1, ancestors)
          if (bad) return bad
        }
        return undefined
      } finally {
        ancestors.delete(value)
      }
    }
    default:
      return { field: path, message: `is ${typeName(value)}, which JSON cannot carry` }
  }
}

const checkRun = (input: SendRunInput): Check | undefined => {
  if (typeof input !== "object" || input === null) return { field: "input", message: "must be an object" }
  if (typeof input.queue !== "string" || !queuePattern.test(input.queue)) {
    return {
      field: "queue",
      message: "must be 1-128 characters of letters, digits and _ . : -, starting with a letter or digit"
    }
  }
  const payload: unknown = input.payload
  if (typeof payload !== "object" || payload === null || Array.isArray(payload) || !isPlainObject(payload)) {
    return { field: "payload", message: `must be a plain JSON object, got ${Array.isArray(payload) ? "an array" : typeName(payload)}` }
  }
  if (input.delayMs !== undefined && input.runAt !== undefined) {
    return { field: "runAt", message: "cannot be combined with delayMs" }
  }
  if (
    input.delayMs !== undefined &&
    (typeof input.delayMs !== "number" || !Number.isFinite(input.delayMs) || input.delayMs < 0 || input.delayMs > limits.delayMs)
  ) {
    return { field: "delayMs", message: `must be a number of milliseconds from 0 to ${limits.delayMs}` }
  }
  return checkId("organizationId", input.organizationId, limits.idLength) ??
    checkOptionalId("agentId", input.agentId, limits.idLength) ??
    checkOptionalId("conversationId", input.conversationId, limits.idLength) ??
    checkOptionalId("idempotencyKey", input.idempotencyKey, limits.idempotencyKeyLength) ??
    checkInteger("priority", input.priority, -limits.priority, limits.priority) ??
    checkInteger("maxAttempts", input.maxAttempts, 1, limits.maxAttempts) ??
    checkInteger("retryDelaySeconds", input.retryDelaySeconds, 0, limits.retryDelaySeconds) ??
    checkDate("runAt", input.runAt) ??
    checkDate("expiresAt", input.expiresAt) ??
    checkJson("payload", payload, 1, new Set())
}

/**
 * Validates one run and shapes it for the insert statement, or says what is wrong with it.
 * `ord` is the run's position in its batch; `inBatch` puts it in the error as `index`.
 */
export const toRunRecord = (input: SendRunInput, ord: number, inBatch: boolean): RunRecord | InvalidRunInput => {
  const bad = checkRun(input)
  if (bad) return new InvalidRunInput(inBatch ? { ...bad, index: ord } : bad)
  return {
    queue: input.queue,
    organization_id: input.organizationId,
    agent_id: input.agentId ?? null,
    conversation_id: input.conversationId ?? null,
    action_input_json: JSON.stringify(input.payload),
    priority: input.priority ?? 0,
    delay_ms: input.delayMs ?? null,
    run_at: input.runAt?.toISOString() ?? null,
    expires_at: input.expiresAt?.toISOString() ?? null,
    max_attempts: input.maxAttempts ?? defaultMaxAttempts,
    retry_delay_seconds: input.retryDelaySeconds ?? null,
    idempotency_key: input.idempotencyKey ?? null
  }
}
