import { assert, layer } from "@effect/vitest"
import { Effect, Layer } from "effect"
import fc from "fast-check"
import { Database } from "../../src/db/Database.ts"
import { InvalidRunInput, type SendRunInput } from "../../src/runs/runInput.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = RunsQueue.layer.pipe(Layer.provideMerge(testDatabaseLayer()))

const base: SendRunInput = { queue: "messages", organizationId: "org", agentId: "a", conversationId: "c", payload: { ok: 1 } }

class Point {
  constructor(readonly x: number) {}
}
const cyclic: Record<string, unknown> = { a: 1 }
cyclic["self"] = cyclic
const deep = (levels: number): Record<string, unknown> => (levels === 0 ? {} : { d: deep(levels - 1) })

// Each case: an input (bypassing the static types, as untyped callers would) and the field the error must name.
const badInputs: ReadonlyArray<readonly [string, unknown, string]> = [
  ["payload is an array", { ...base, payload: [1, 2] }, "payload"],
  ["payload is a string", { ...base, payload: "{\"a\":1}" }, "payload"],
  ["payload is null", { ...base, payload: null }, "payload"],
  ["payload is a Date", { ...base, payload: new Date() }, "payload"],
  ["payload is a Map", { ...base, payload: new Map([["a", 1]]) }, "payload"],
  ["payload holds a class instance", { ...base, payload: { p: new Point(1) } }, "payload.p"],
  ["payload holds a Date", { ...base, payload: { at: new Date() } }, "payload.at"],
  ["payload holds undefined", { ...base, payload: { a: undefined } }, "payload.a"],
  ["payload holds a function", { ...base, payload: { f: () => 1 } }, "payload.f"],
  ["payload holds a BigInt", { ...base, payload: { n: 10n } }, "payload.n"],
  ["payload holds NaN", { ...base, payload: { list: [1, Number.NaN] } }, "payload.list[1]"],
  ["payload holds Infinity", { ...base, payload: { x: Number.POSITIVE_INFINITY } }, "payload.x"],
  ["payload holds an integer beyond 2^53", { ...base, payload: { n: [2 ** 53] } }, "payload.n[0]"],
  ["payload holds a number below -(2^53)", { ...base, payload: { n: -1e300 } }, "payload.n"],
  ["payload holds a symbol", { ...base, payload: { s: Symbol("s") } }, "payload.s"],
  ["payload has a symbol key", { ...base, payload: { [Symbol("k")]: 1 } }, "payload"],
  ["payload has an array hole", { ...base, payload: { holes: [1, , 3] } }, "payload.holes[1]"],
  ["payload holds U+0000", { ...base, payload: { text: "a\u0000b" } }, "payload.text"],
  ["payload key holds U+0000", { ...base, payload: { "k\u0000": 1 } }, "payload[\"k\\u0000\"]"],
  ["payload holds a lone surrogate", { ...base, payload: { text: "\uD83D" } }, "payload.text"],
  ["payload is cyclic", { ...base, payload: cyclic }, "payload.self"],
  ["payload nests too deep", { ...base, payload: deep(101) }, "payload" + ".d".repeat(100)],
  ["queue is empty", { ...base, queue: "" }, "queue"],
  ["queue is too long", { ...base, queue: "q".repeat(129) }, "queue"],
  ["queue holds U+0000", { ...base, queue: "q\u0000" }, "queue"],
  ["queue is not a string", { ...base, queue: 7 }, "queue"],
  ["organizationId is missing", { ...base, organizationId: undefined }, "organizationId"],
  ["organizationId is empty", { ...base, organizationId: "" }, "organizationId"],
  ["organizationId is too long", { ...base, organizationId: "o".repeat(257) }, "organizationId"],
  ["organizationId holds U+0000", { ...base, organizationId: "o\u0000" }, "organizationId"],
  ["agentId is empty", { ...base, agentId: "" }, "agentId"],
  ["conversationId is too long", { ...base, conversationId: "c".repeat(257) }, "conversationId"],
  ["idempotencyKey is empty", { ...base, idempotencyKey: "" }, "idempotencyKey"],
  ["idempotencyKey is too long", { ...base, idempotencyKey: "k".repeat(513) }, "idempotencyKey"],
  ["priority is fractional", { ...base, priority: 1.5 }, "priority"],
  ["priority is out of range", { ...base, priority: 1_000_001 }, "priority"],
  ["maxAttempts is zero", { ...base, maxAttempts: 0 }, "maxAttempts"],
  ["maxAttempts is too large", { ...base, maxAttempts: 1001 }, "maxAttempts"],
  ["retryDelaySeconds is negative", { ...base, retryDelaySeconds: -1 }, "retryDelaySeconds"],
  ["delayMs is negative", { ...base, delayMs: -1 }, "delayMs"],
  ["delayMs is NaN", { ...base, delayMs: Number.NaN }, "delayMs"],
  ["runAt and delayMs together", { ...base, runAt: new Date(), delayMs: 5 }, "runAt"],
  ["runAt is an invalid Date", { ...base, runAt: new Date("nope") }, "runAt"],
  ["expiresAt is a string", { ...base, expiresAt: "2030-01-01" }, "expiresAt"]
]

const countRuns = Effect.gen(function*() {
  const { use } = yield* Database
  const [row] = yield* use("test.countRuns", (sql) => sql<Array<{ n: number }>>`select count(*)::int as n from runs`)
  return row!.n
})

// Property runs per test: each case is one round trip, so a few hundred cost well under a second.
const propertyRuns = 200

/** What PostgreSQL cannot store, anywhere in a string. */
const unstorable = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/
const storable = (value: unknown): boolean => {
  if (typeof value === "string") return !unstorable.test(value)
  if (typeof value === "number") return Math.abs(value) <= Number.MAX_SAFE_INTEGER
  if (Array.isArray(value)) return value.every(storable)
  if (typeof value === "object" && value !== null) {
    return Object.entries(value).every(([key, item]) => !unstorable.test(key) && storable(item))
  }
  return true
}

layer(TestLayer, { excludeTestServices: true })("RunsQueue input validation", (it) => {
  for (const [name, input, field] of badInputs) {
    it.effect(`${name}: InvalidRunInput naming ${field}, nothing written`, () =>
      Effect.gen(function*() {
        const queue = yield* RunsQueue
        const before = yield* countRuns
        const error = yield* Effect.flip(queue.send(input as SendRunInput))
        assert.instanceOf(error, InvalidRunInput)
        assert.strictEqual((error as InvalidRunInput).field, field)
        assert.isAbove(error.message.length, 0)
        assert.strictEqual(yield* countRuns, before)
      }))
  }

  it.effect("any JSON object round-trips exactly and is stored as a jsonb object; unstorable text and numbers beyond 2^53 are refused", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const { use } = yield* Database
      const payloads = fc.dictionary(
        fc.string({ unit: "binary" }),
        fc.jsonValue({ stringUnit: "binary", maxDepth: 4 }),
        { maxKeys: 6 }
      )
      yield* Effect.promise(() =>
        fc.assert(
          fc.asyncProperty(payloads, async (payload) => {
            const result = await Effect.runPromise(Effect.result(queue.send({ ...base, payload: payload as never })))
            if (!storable(payload)) {
              return result._tag === "Failure" && result.failure._tag === "InvalidRunInput"
            }
            if (result._tag === "Failure") throw result.failure
            const [row] = await Effect.runPromise(use("test", (sql) =>
              sql<Array<{ action_input: unknown; kind: string }>>`
                select action_input, jsonb_typeof(action_input) as kind from runs where id = ${result.success.id}`))
            // JSON itself has no -0; JSON.parse(JSON.stringify(x)) is the exact JSON meaning of the payload.
            assert.deepStrictEqual(row!.action_input, JSON.parse(JSON.stringify(payload)))
            return row!.kind === "object"
          }),
          { numRuns: propertyRuns }
        )
      )
    }))
})
