/**
 * `npm run db:backfill` as its own process, killed with SIGKILL half way and run again: every row is
 * processed exactly once. A trigger installed by the test (in this file's own database) counts updates.
 */
import { assert, describe, it } from "@effect/vitest"
import { spawn } from "node:child_process"
import { Effect } from "effect"
import postgres from "postgres"
import { eventually } from "../support/lockHarness.ts"
import { projectRoot } from "../support/serviceProcess.ts"
import { createDatabase, dropDatabase } from "../support/testDatabase.ts"

const rowCount = 300

const startBackfill = (url: string, args: ReadonlyArray<string>) => {
  const child = spawn(process.execPath, ["--import", "tsx", "src/backfill.ts", "runs_legacy_scope", ...args], {
    cwd: projectRoot,
    env: { PATH: process.env["PATH"] ?? "", HOME: process.env["HOME"] ?? "", DATABASE_URL: url },
    stdio: ["ignore", "pipe", "pipe"]
  })
  let output = ""
  child.stdout.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")))
  child.stderr.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")))
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })))
  return { child, exited, output: () => output }
}

describe("npm run db:backfill", () => {
  it.live("killed with SIGKILL half way, then run again, processes every row exactly once", () =>
    Effect.acquireUseRelease(
      Effect.promise(async () => {
        const db = await createDatabase({ migrated: true })
        return { db, client: postgres(db.url, { max: 1, onnotice: () => {} }) }
      }),
      ({ db, client }) =>
        Effect.gen(function*() {
          yield* Effect.promise(async () => {
            await client`create table run_updates (run_id bigint not null)`
            await client.unsafe(`
              create function count_run_update() returns trigger language plpgsql as $$
              begin insert into run_updates values (new.id); return new; end $$`)
            await client`create trigger count_run_update after update on runs for each row execute function count_run_update()`
            // Every third row has no usable conversation: it must stay untouched.
            await client`
              insert into runs (organization_id, queue, action_input)
              select 'org', 'messages',
                     case when i % 3 = 0 then jsonb_build_object('agentId', 'a' || i)
                          else jsonb_build_object('agentId', 'a' || i, 'conversationId', 'c' || i) end
                from generate_series(1, ${rowCount}) as i`
          })
          const checkpoint = () =>
            Effect.promise(() =>
              client<Array<{ rows_done: number; rows_changed: number }>>`
                select rows_done::int, rows_changed::int from runlane_backfills where name = 'runs_legacy_scope'`)
          // 10 rows a batch at 100 rows a second: about 3 s for the whole table, killed after a few batches.
          const first = startBackfill(db.url, ["--batch-size=10", "--rate=100"])
          yield* eventually("some batches committed", Effect.map(checkpoint(), (rows) => (rows[0]?.rows_done ?? 0) >= 50), 30_000)
          first.child.kill("SIGKILL")
          const killed = yield* Effect.promise(() => first.exited)
          assert.strictEqual(killed.signal, "SIGKILL")
          // Not a terminal: a progress line a second on stderr, with rows done, the rate and the time left.
          assert.match(first.output(), /\] +\d+% [\d,]+\/[\d,]+ rows +[\d,]+ rows\/s +\S+ left/, first.output())
          const [stopped] = yield* checkpoint()
          assert.isBelow(stopped!.rows_done, rowCount, "killed before the end")
          // Rows changed and the checkpoint moved together, batch by batch.
          const [changedSoFar] = yield* Effect.promise(() => client`select count(*)::int as n from runs where not legacy_scope`)
          assert.strictEqual(changedSoFar!["n"], stopped!.rows_changed)

          const second = startBackfill(db.url, ["--rate=0"])
          const finished = yield* Effect.promise(() => second.exited)
          assert.strictEqual(finished.code, 0, second.output())
          assert.include(second.output(), "finished")
          const [done] = yield* checkpoint()
          assert.deepStrictEqual(done, { rows_done: rowCount, rows_changed: rowCount - rowCount / 3 })
          const twice = yield* Effect.promise(() =>
            client`select run_id from run_updates group by run_id having count(*) > 1`)
          assert.strictEqual(twice.length, 0)
          const [updated] = yield* Effect.promise(() => client`select count(*)::int as n from run_updates`)
          assert.strictEqual(updated!["n"], rowCount - rowCount / 3)
          const [wrong] = yield* Effect.promise(() =>
            client`
              select count(*)::int as n from runs
               where (legacy_scope and conversation_id is not null)
                  or (not legacy_scope and (agent_id is distinct from action_input->>'agentId'
                                             or conversation_id is distinct from action_input->>'conversationId'))`)
          assert.strictEqual(wrong!["n"], 0)
        }),
      ({ db, client }) => Effect.promise(async () => {
        await client.end({ timeout: 5 })
        await dropDatabase(db.name)
      })
    ), 90_000)
})
