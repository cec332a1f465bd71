/**
 * RunOwnership: does this run belong to this (organization, agent, conversation)?
 *
 * One primary-key lookup. The scope columns written by `RunsQueue.send` decide, and for a run created by
 * runlane they alone decide: an omitted agent or conversation stays absent, whatever the payload says
 * (the payload is the producer's, not a scope). Only a row marked `legacy_scope` (written by an older
 * writer, which the database marks by default; see schema/runs.ts) falls back, where a column is NULL, to
 * the `agentId` / `conversationId` keys inside `action_input`, which older writers sometimes stored as a
 * JSON string holding the object. The comparison is exact string equality: no trimming, no case
 * folding, no Unicode normalisation.
 */
import { Context, Effect, Layer, Option, Predicate } from "effect"
import { Database } from "../db/Database.ts"
import type { DatabaseError } from "../db/DatabaseError.ts"

export interface RunScope {
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
}

export interface ScopeRow {
  readonly organization_id: string
  readonly agent_id: string | null
  readonly conversation_id: string | null
  /** true for a row written by an older writer: only such a row may take its scope from action_input. */
  readonly legacy_scope: boolean
  /** Only read when the row is legacy and a scope column is missing. */
  readonly action_input: unknown
}

const isCompleteScope = (scope: RunScope): boolean =>
  Predicate.isObject(scope) &&
  [scope.organizationId, scope.agentId, scope.conversationId].every((id) => Predicate.isString(id) && id.length > 0)

/** `action_input` as an object: the object itself, or the object a legacy JSON-string row holds. */
const legacyObject = (actionInput: unknown): Record<string, unknown> | undefined => {
  let value = actionInput
  if (Predicate.isString(value)) {
    try {
      value = JSON.parse(value)
    } catch {
      return undefined
    }
  }
  return Predicate.isObject(value) && !Array.isArray(value) ? (value as Record<string, unknown>) : undefined
}

/** A run's scope as stored; agent or conversation is undefined when the run has none. */
export interface StoredRunScope {
  readonly organizationId: string
  readonly agentId: string | undefined
  readonly conversationId: string | undefined
}

/**
 * Pure: the row's scope, from the typed columns or, for a legacy row only and where a column is
 * missing, from `action_input`. The backfill (backfills/runsLegacyScope.ts) uses it too, so a legacy
 * row's scope is the same before and after it is backfilled.
 */
export const scopeOfRow = (row: ScopeRow): StoredRunScope => {
  const legacy = row.legacy_scope && (row.agent_id === null || row.conversation_id === null)
    ? legacyObject(row.action_input)
    : undefined
  const fromLegacy = (key: string): string | undefined => {
    const value = legacy?.[key]
    return Predicate.isString(value) ? value : undefined
  }
  return {
    organizationId: row.organization_id,
    agentId: row.agent_id ?? fromLegacy("agentId"),
    conversationId: row.conversation_id ?? fromLegacy("conversationId")
  }
}

/** Pure: does the row match the scope in every field? */
export const rowMatchesScope = (row: ScopeRow, scope: RunScope): boolean => {
  if (row.organization_id !== scope.organizationId) return false
  const stored = scopeOfRow(row)
  return stored.agentId === scope.agentId && stored.conversationId === scope.conversationId
}

export class RunOwnership extends Context.Service<RunOwnership, {
  /** true only when the run exists and its organization, agent and conversation all equal the scope's. */
  readonly verify: (runId: number, scope: RunScope) => Effect.Effect<boolean, DatabaseError>
  /** The scope a run was written with (for minting its token); none when there is no such run. */
  readonly scopeOf: (runId: number) => Effect.Effect<Option.Option<StoredRunScope>, DatabaseError>
}>()("runlane/RunOwnership") {
  static readonly layer = Layer.effect(
    RunOwnership,
    Effect.gen(function*() {
      const database = yield* Database

      // Untraced: on this hot path Effect.fn's span and call-site capture measured ~70 µs per call, more
      // than the primary-key lookup itself (npm run bench).
      const scopeRow = (operation: string, runId: number) =>
        Effect.map(
          database.use(operation, (sql) =>
            sql<Array<ScopeRow>>`
              select organization_id, agent_id, conversation_id, legacy_scope,
                     case when legacy_scope and (agent_id is null or conversation_id is null)
                          then action_input end as action_input
                from runs
               where id = ${runId}`),
          (rows) => rows[0]
        )

      const verify = Effect.fnUntraced(function*(runId: number, scope: RunScope) {
        if (!Number.isSafeInteger(runId) || runId <= 0 || !isCompleteScope(scope)) return false
        const row = yield* scopeRow("RunOwnership.verify", runId)
        return row !== undefined && rowMatchesScope(row, scope)
      })

      const scopeOf = Effect.fn("RunOwnership.scopeOf")(function*(runId: number) {
        if (!Number.isSafeInteger(runId) || runId <= 0) return Option.none()
        const row = yield* scopeRow("RunOwnership.scopeOf", runId)
        return row === undefined ? Option.none() : Option.some(scopeOfRow(row))
      })

      return RunOwnership.of({ verify, scopeOf })
    })
  )
}
