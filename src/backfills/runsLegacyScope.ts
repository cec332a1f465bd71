/**
 * The `runs_legacy_scope` backfill: copies the scope of rows written by an older writer (marked
 * `legacy_scope`, see schema/runs.ts) from `action_input` into `agent_id` / `conversation_id`, and clears
 * the mark, so RunOwnership stops reading their payload.
 *
 * A row's scope is decided by `scopeOfRow`, the very function RunOwnership verifies with, so a row
 * answers the same before and after. Both keys are filled together or not at all: a row whose scope is
 * incomplete (a key missing, JSON null, a number, an empty string, a payload that is not an object or a
 * JSON string holding one) is left untouched, still legacy, and counted as skipped. A changed row whose
 * payload was a JSON string holding the object gets the object itself. Rows are selected by
 * keyset (`id > last ORDER BY id LIMIT n`) over the partial index `runs_legacy_scope_idx`, so each batch
 * reads only the rows it changes, however large the table; the batch's rows are locked (FOR NO KEY
 * UPDATE) so a concurrent writer cannot change a scope between the read and the update.
 */
import type postgres from "postgres"
import { type ScopeRow, scopeOfRow } from "../ownership/RunOwnership.ts"
import type { BackfillDefinition } from "./Backfills.ts"

interface LegacyRow extends ScopeRow {
  readonly id: string
}

const usable = (value: string | undefined): value is string => value !== undefined && value.length > 0

export const runsLegacyScope: BackfillDefinition = {
  name: "runs_legacy_scope",
  description: "fill runs.agent_id and runs.conversation_id from action_input on rows marked legacy_scope",
  needed: async (sql) => {
    const [row] = await sql<Array<{ needed: boolean }>>`select exists (select 1 from runs where legacy_scope) as needed`
    return row?.needed === true
  },
  remaining: async (sql, afterId) => {
    const [row] = await sql<Array<{ n: number }>>`
      select count(*)::float8 as n from runs where legacy_scope and id > ${afterId}`
    return row?.n ?? 0
  },
  batch: async (tx: postgres.TransactionSql, afterId, limit) => {
    const rows = await tx<Array<LegacyRow>>`
      select r.id::text as id, r.organization_id, r.agent_id, r.conversation_id, r.legacy_scope, r.action_input
        from runs r
       where r.legacy_scope and r.id > ${afterId}
       -- r.id, the bigint: the output column "id" is text and would sort "10" before "2".
       order by r.id
       limit ${limit}
         for no key update`
    const ids: Array<string> = []
    const agents: Array<string> = []
    const conversations: Array<string> = []
    const objects: Array<string | null> = []
    for (const row of rows) {
      const scope = scopeOfRow(row)
      if (usable(scope.agentId) && usable(scope.conversationId)) {
        ids.push(row.id)
        agents.push(scope.agentId)
        conversations.push(scope.conversationId)
        // A JSON string holding the object (the older writer's double encoding) becomes that object: the
        // table's CHECK (jsonb_typeof = 'object') applies to updated rows even while it is NOT VALID.
        objects.push(typeof row.action_input === "string" ? row.action_input : null)
      }
    }
    if (ids.length > 0) {
      await tx`
        update runs r
           set agent_id = v.agent_id, conversation_id = v.conversation_id, legacy_scope = false,
               action_input = coalesce(v.action_input::jsonb, r.action_input)
          from unnest(${ids}::int8[], ${agents}::text[], ${conversations}::text[], ${objects}::text[])
               as v(id, agent_id, conversation_id, action_input)
         where r.id = v.id`
    }
    return {
      lastId: rows.length === 0 ? afterId : Number(rows[rows.length - 1]!.id),
      looked: rows.length,
      changed: ids.length
    }
  }
}
