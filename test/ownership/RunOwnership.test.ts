import { assert, layer } from "@effect/vitest"
import { Effect, Layer, Option } from "effect"
import fc from "fast-check"
import { Database } from "../../src/db/Database.ts"
import { RunOwnership, type RunScope } from "../../src/ownership/RunOwnership.ts"
import { RunsQueue } from "../../src/runs/RunsQueue.ts"
import { testDatabaseLayer } from "../support/testDatabase.ts"

const TestLayer = Layer.mergeAll(RunOwnership.layer, RunsQueue.layer).pipe(Layer.provideMerge(testDatabaseLayer()))

const scope: RunScope = { organizationId: "org-a", agentId: "agent-x", conversationId: "telegram:6570514069" }

const sendFor = (s: RunScope) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    return yield* queue.send({ queue: "messages", ...s, payload: { agentId: s.agentId, conversationId: s.conversationId } })
  })

/** Inserts a row the way an older writer did: no agent/conversation columns, the scope only in action_input. */
const insertLegacy = (organizationId: string, actionInput: string) =>
  Effect.gen(function*() {
    const { use } = yield* Database
    const [row] = yield* use("test.insertLegacy", (sql) =>
      sql<Array<{ id: string }>>`
        insert into runs (organization_id, queue, action_input)
        values (${organizationId}, 'messages', ${actionInput}::text::jsonb)
        returning id::text`)
    return Number(row!.id)
  })

layer(TestLayer, { excludeTestServices: true })("RunOwnership.verify", (it) => {
  it.effect("true for the run's own scope, false when any one field differs", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const { id } = yield* sendFor(scope)
      assert.isTrue(yield* ownership.verify(id, scope))
      assert.isFalse(yield* ownership.verify(id, { ...scope, organizationId: "org-b" }))
      assert.isFalse(yield* ownership.verify(id, { ...scope, agentId: "agent-y" }))
      assert.isFalse(yield* ownership.verify(id, { ...scope, conversationId: "telegram:6570514070" }))
      assert.isFalse(yield* ownership.verify(id, { ...scope, agentId: "AGENT-X" }))
    }))

  it.effect("false for a missing run, a partial scope, or a run id that is not a positive integer", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const { id } = yield* sendFor(scope)
      assert.isFalse(yield* ownership.verify(id + 1_000_000, scope))
      assert.isFalse(yield* ownership.verify(id, { ...scope, agentId: "" }))
      assert.isFalse(yield* ownership.verify(id, { organizationId: "org-a", conversationId: scope.conversationId } as RunScope))
      for (const bad of [0, -1, 1.5, Number.NaN, Number.MAX_SAFE_INTEGER + 2]) {
        assert.isFalse(yield* ownership.verify(bad, scope))
      }
    }))

  it.effect("a run written without scope columns falls back to the keys in action_input", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const id = yield* insertLegacy("org-a", JSON.stringify({ agentId: "agent-x", conversationId: scope.conversationId }))
      assert.isTrue(yield* ownership.verify(id, scope))
      assert.isFalse(yield* ownership.verify(id, { ...scope, organizationId: "org-b" }))
      assert.isFalse(yield* ownership.verify(id, { ...scope, agentId: "agent-y" }))
      const nulls = yield* insertLegacy("org-a", JSON.stringify({ agentId: null, conversationId: null }))
      assert.isFalse(yield* ownership.verify(nulls, scope))
      const numbers = yield* insertLegacy("org-n", JSON.stringify({ agentId: 7, conversationId: 8 }))
      assert.isFalse(yield* ownership.verify(numbers, { organizationId: "org-n", agentId: "7", conversationId: "8" }))
    }))

  it.effect("a run sent by runlane takes its scope from its columns only, never from its payload", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const queue = yield* RunsQueue
      const asked = { organizationId: "org-a", agentId: "agent-x", conversationId: "conv-of-another-run" }
      const { id } = yield* queue.send({
        queue: "messages",
        organizationId: "org-a",
        agentId: "agent-x",
        payload: { agentId: "agent-x", conversationId: "conv-of-another-run" }
      })
      assert.isFalse(yield* ownership.verify(id, asked))
      const stored = yield* ownership.scopeOf(id)
      assert.deepStrictEqual(Option.getOrUndefined(stored), { organizationId: "org-a", agentId: "agent-x", conversationId: undefined })
      const noAgent = yield* queue.send({ queue: "messages", organizationId: "org-a", payload: { agentId: "agent-x" } })
      assert.strictEqual(Option.getOrUndefined(yield* ownership.scopeOf(noAgent.id))?.agentId, undefined)
    }))

  it.effect("a row marked legacy_scope = false never falls back to action_input, whoever wrote it", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const { use } = yield* Database
      const [row] = yield* use("test", (sql) =>
        sql<Array<{ id: string }>>`
          insert into runs (organization_id, queue, action_input, legacy_scope)
          values ('org-a', 'messages', ${JSON.stringify({ agentId: "agent-x", conversationId: scope.conversationId })}::text::jsonb, false)
          returning id::text`)
      assert.isFalse(yield* ownership.verify(Number(row!.id), scope))
    }))

  it.effect("legacy rows holding a JSON string of an object are read through the string", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      const { use } = yield* Database
      // runlane's table refuses non-object action_input; a table adopted from an older writer may hold
      // such rows under a NOT VALID constraint. Simulate that in this file's own database.
      yield* use("test", (sql) => sql`alter table runs drop constraint runs_action_input_object_check`)
      const inner = JSON.stringify({ agentId: "agent-x", conversationId: scope.conversationId })
      const id = yield* insertLegacy("org-a", JSON.stringify(inner))
      const [row] = yield* use("test", (sql) =>
        sql<Array<{ kind: string }>>`select jsonb_typeof(action_input) as kind from runs where id = ${id}`)
      assert.strictEqual(row!.kind, "string")
      assert.isTrue(yield* ownership.verify(id, scope))
      assert.isFalse(yield* ownership.verify(id, { ...scope, conversationId: "other" }))
      const garbage = yield* insertLegacy("org-a", JSON.stringify("not json {"))
      assert.isFalse(yield* ownership.verify(garbage, scope))
      yield* use("test", (sql) =>
        sql`alter table runs add constraint runs_action_input_object_check check (jsonb_typeof(action_input) = 'object') not valid`)
    }))

  it.effect("agrees with plain equality of scopes over generated ids (unicode, colons, look-alikes)", () =>
    Effect.gen(function*() {
      const ownership = yield* RunOwnership
      // Look-alikes: separator shifts, case, NFC vs NFD, a Cyrillic 'а', trailing space, zero-width joiner.
      const tricky = fc.constantFrom(
        "a", "a:b", "b", "b:c", "c", "A", "a ", "caf\u00e9", "cafe\u0301", "\u0430", "a\u200db", "日本", "🙂", "::"
      )
      const storableText = fc.string({ unit: "grapheme", minLength: 1, maxLength: 12 })
      const id = fc.oneof(tricky, storableText)
      const scopes = fc.record({ organizationId: id, agentId: id, conversationId: id })
      // Biased towards near-misses: the asked scope copies the run's scope except for at most one field.
      const pairs = fc.tuple(scopes, scopes, fc.constantFrom("same", "organizationId", "agentId", "conversationId", "other"))
        .map(([run, other, mode]): readonly [RunScope, RunScope] =>
          mode === "same" ? [run, { ...run }] : mode === "other" ? [run, other] : [run, { ...run, [mode]: other[mode] }]
        )
      const queue = yield* RunsQueue
      yield* Effect.promise(() =>
        fc.assert(
          fc.asyncProperty(pairs, async ([runScope, asked]) => {
            const { id: runId } = await Effect.runPromise(
              queue.send({ queue: "messages", ...runScope, payload: {} })
            )
            const expected = runScope.organizationId === asked.organizationId &&
              runScope.agentId === asked.agentId && runScope.conversationId === asked.conversationId
            return (await Effect.runPromise(ownership.verify(runId, asked))) === expected
          }),
          { numRuns: 200 }
        )
      )
    }))
})
