/**
 * A record, kept by the database itself, of every status change of every run: a trigger stamps each
 * change with clock_timestamp(), taken while the changing statement runs, after its snapshot. A claim
 * of a conversation's next run can only see the previous run settled once that settle committed, so
 * in this record a conversation's claims and settles must alternate, whatever the claimers believed.
 */
import { Effect } from "effect"
import { Database } from "../../src/db/Database.ts"

export const installClaimAudit = Effect.gen(function*() {
  const { use } = yield* Database
  yield* use("test.installClaimAudit", (sql) =>
    sql.begin(async (tx) => {
      await tx`
        create table run_audit (
          seq bigint generated always as identity, run_id bigint, conversation text,
          old_status text, new_status text, claimed_by text, at timestamptz)`
      await tx`
        create function run_audit() returns trigger language plpgsql as $$
        begin
          insert into run_audit (run_id, conversation, old_status, new_status, claimed_by, at)
          values (new.id, new.organization_id || '/' || coalesce(new.agent_id, '') || '/' || new.conversation_id,
                  old.status, new.status, coalesce(new.claimed_by, old.claimed_by), clock_timestamp());
          return new;
        end $$`
      await tx`
        create trigger run_audit after update of status on runs
          for each row when (old.status is distinct from new.status and new.conversation_id is not null)
          execute function run_audit()`
    }))
})

interface AuditRow {
  readonly run_id: string
  readonly conversation: string
  readonly old_status: string
  readonly new_status: string
}

/**
 * Problems found in the record, in plain English: a conversation with a second run claimed before the
 * first was settled, or with its runs claimed out of id order.
 */
export const auditConversations = Effect.gen(function*() {
  const { use } = yield* Database
  const rows = yield* use("test.readAudit", (sql) =>
    sql<Array<AuditRow>>`select run_id::text, conversation, old_status, new_status from run_audit order by at, seq`)
  const problems: Array<string> = []
  const holder = new Map<string, string>()
  const lastClaimed = new Map<string, number>()
  for (const row of rows) {
    if (row.new_status === "claimed") {
      const held = holder.get(row.conversation)
      if (held !== undefined) problems.push(`${row.conversation}: run ${row.run_id} claimed while run ${held} was claimed`)
      const previous = lastClaimed.get(row.conversation) ?? 0
      if (Number(row.run_id) < previous) problems.push(`${row.conversation}: run ${row.run_id} claimed after run ${previous}`)
      holder.set(row.conversation, row.run_id)
      lastClaimed.set(row.conversation, Number(row.run_id))
    } else if (row.old_status === "claimed" && holder.get(row.conversation) === row.run_id) {
      holder.delete(row.conversation)
    }
  }
  return { problems, claims: rows.filter((row) => row.new_status === "claimed").length }
})
