/**
 * UploadGroups under concurrency: deadlocks, retries and admission. Every interleaving is made by the
 * database, not by timing: a test trigger (fault injection, dropped after each test) pauses statements
 * on an advisory lock the test holds, and pg_stat_activity says which statements wait.
 */
import { beforeAll, describe, expect, it } from "vitest"
import type { DatabaseError } from "../../src/db/DatabaseError.ts"
import { UploadGroups, UploadsBusy } from "../../src/snapshots/uploadGroups.ts"
import { type Answer, limits, row, scope, upload, uploadGroupsDatabase, waitUntil } from "../support/uploadGroupsHarness.ts"

const { newRuns, sql: db, storedRuns, uploadStatements: sent } = uploadGroupsDatabase({
  max: 8,
  // The plan of a large runs table: each VALUES row looks its run up through the primary key, so
  // rows are inserted in the order the statement lists them (a small table is hashed instead, which
  // happens to take them in run id order and would hide an ordering bug).
  connection: { enable_hashjoin: "off", enable_mergejoin: "off", enable_seqscan: "off" }
})

beforeAll(async () => {
  // Open every connection now, so a statement is written the moment it is sent.
  await Promise.all(Array.from({ length: 8 }, () => db()`select pg_backend_pid()`))
})

const sqlStates = (answers: ReadonlyArray<Answer>) =>
  answers.map((answer) => (answer.error as DatabaseError | undefined)?.sqlState)

/** Upload statements of this database waiting on a lock (the barrier, a row lock or a table lock). */
const waitingUploads = async () => {
  const [waiting] = await db()<Array<{ count: number }>>`
    select count(*)::int as count from pg_stat_activity
     where datname = current_database() and wait_event_type = 'Lock'
       and query like 'insert into agent_transcript_snapshots%'`
  return waiting!.count
}

const barrierKey = 4_711

/**
 * Installs a BEFORE INSERT trigger whose body (PL/pgSQL, with `n` the row's number within its
 * transaction) may pause on the barrier, holds the barrier, runs `f` with a function that opens it,
 * and removes it all afterwards.
 */
const withBarrierTrigger = async (body: string, f: (open: () => Promise<void>) => Promise<void>) => {
  await db().unsafe(`
    create function test_barrier() returns trigger language plpgsql as $$
    declare n int := coalesce(nullif(current_setting('test.rows', true), ''), '0')::int + 1;
    begin
      perform set_config('test.rows', n::text, true);
      ${body}
      return new;
    end $$;
    create trigger test_barrier before insert on agent_transcript_snapshots
      for each row execute function test_barrier();`)
  const holder = await db().reserve()
  let closed = true
  const open = async () => {
    if (!closed) return
    closed = false
    await holder`select pg_advisory_unlock(${barrierKey})`
  }
  try {
    await holder`select pg_advisory_lock(${barrierKey})`
    await f(open)
  } finally {
    await open()
    holder.release()
    await db().unsafe("drop trigger test_barrier on agent_transcript_snapshots; drop function test_barrier()")
  }
}

const pauseBeforeSecondRow = `if n = 2 then perform pg_advisory_xact_lock_shared(${barrierKey}); end if;`

describe("UploadGroups under concurrency", () => {
  it("[R1, R2, R3, R2', R1'] in one tick: a run in flight is held back, so no deadlock and every upload is answered", async () => {
    const groups = new UploadGroups(db())
    const [r1, r2, r3] = await newRuns(3)
    await withBarrierTrigger(pauseBeforeSecondRow, async (open) => {
      const before = sent()
      const answers = [r1!, r2!, r3!, r2!, r1!].map((runId, index) => upload(groups, row(runId, `upload ${index}\n`)))
      // Every statement sent has written its first row and waits before its second.
      await waitUntil(async () => {
        const waiting = await waitingUploads()
        return waiting > 0 && waiting === sent() - before
      }, "every upload statement sent waits at the barrier")
      await open()
      const settled = await Promise.all(answers)
      expect(sqlStates(settled)).toEqual([undefined, undefined, undefined, undefined, undefined])
      // The first upload of each run wins; the second ones meet the stored row and store nothing.
      expect(settled.map((answer) => answer.id !== undefined)).toEqual([true, true, true, false, false])
      // R1, R2, R3, then the held-back R1', R2': no statement was aborted and sent again.
      expect(sent() - before).toBe(2)
    })
    expect(await storedRuns([r1!, r2!, r3!])).toEqual([r1, r2, r3])
  })

  it("two processes' statements take rows in run id order, so they wait on each other but never deadlock", async () => {
    // Two UploadGroups stand for two processes: neither can hold back the other's runs.
    const first = new UploadGroups(db())
    const second = new UploadGroups(db())
    const [r1, r2] = await newRuns(2)
    await withBarrierTrigger(pauseBeforeSecondRow, async (open) => {
      const before = sent()
      const answers = [
        upload(first, row(r1!, "first process\n")),
        upload(first, row(r2!, "first process\n")),
        upload(second, row(r2!, "second process\n")),
        upload(second, row(r1!, "second process\n"))
      ]
      await waitUntil(async () => (await waitingUploads()) === 2, "both statements wait (barrier or row)")
      await open()
      const settled = await Promise.all(answers)
      expect(sqlStates(settled)).toEqual([undefined, undefined, undefined, undefined])
      expect(settled.filter((answer) => answer.id !== undefined)).toHaveLength(2)
      // One statement each: neither was aborted by a deadlock and sent again.
      expect(sent() - before).toBe(2)
    })
    expect(await storedRuns([r1!, r2!])).toEqual([r1, r2])
  })

  it("a statement aborted by a deadlock with another writer goes again once, and its uploads succeed", async () => {
    const groups = new UploadGroups(db())
    const [r1, r2] = await newRuns(2)
    const other = await db().reserve()
    try {
      // The other writer: inserts R2's row and, once the group waits on it, R1's, closing the cycle.
      await other`begin`
      // Its own deadlock check comes later, so PostgreSQL aborts the group's statement, not this one.
      await other`set local deadlock_timeout = '60s'`
      await other`
        insert into agent_transcript_snapshots
          (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
        values (${scope.organizationId}, ${scope.agentId}, ${scope.conversationId}, ${r2!}, 'other', 5, 'completed')`
      const answers = [upload(groups, row(r1!)), upload(groups, row(r2!))]
      await waitUntil(async () => (await waitingUploads()) === 1, "the group waits on the other writer's R2")
      await other`
        insert into agent_transcript_snapshots
          (organization_id, agent_id, conversation_id, run_id, snapshot_jsonl, byte_size, terminal_status)
        values (${scope.organizationId}, ${scope.agentId}, ${scope.conversationId}, ${r1!}, 'other', 5, 'completed')`
      await other`rollback`
      const settled = await Promise.all(answers)
      expect(sqlStates(settled)).toEqual([undefined, undefined])
      expect(settled.every((answer) => answer.id !== undefined)).toBe(true)
    } finally {
      other.release()
    }
    expect(await storedRuns([r1!, r2!])).toEqual([r1, r2])
  })

  it("row-by-row retries after a refused group stay within maxStatementsInFlight", async () => {
    const groups = new UploadGroups(db(), limits({ maxStatementsInFlight: 1 }))
    const runIds = await newRuns(4)
    // The fault: the row of the smallest run id is refused at once; every other row waits at the barrier.
    const body = `if new.snapshot_jsonl = 'bad' then raise exception 'refused' using errcode = '22023'; end if;
      perform pg_advisory_xact_lock_shared(${barrierKey});`
    await withBarrierTrigger(body, async (open) => {
      const answers = runIds.map((runId, index) => upload(groups, row(runId, index === 0 ? "bad" : "good\n")))
      // The bad row fails again alone; the three good ones are either waiting in PostgreSQL or queued.
      const bad = await answers[0]!
      expect((bad.error as DatabaseError | undefined)?.sqlState).toBe("22023")
      await waitUntil(async () => (await waitingUploads()) === 3 - groups.queued, "every good row is sent or queued")
      expect(await waitingUploads()).toBe(1)
      expect(groups.queued).toBe(2)
      await open()
      const good = await Promise.all(answers.slice(1))
      expect(good.every((answer) => answer.error === undefined && answer.id !== undefined)).toBe(true)
    })
    expect(await storedRuns(runIds)).toEqual(runIds.slice(1))
  })

  it("admission: beyond maxQueuedUploads or maxQueuedBytes an upload fails UploadsBusy at once; a queued one fails it at its deadline", async () => {
    const groups = new UploadGroups(
      db(),
      limits({ maxStatementsInFlight: 1, maxQueuedUploads: 2, maxQueuedBytes: 100, queueTimeoutMs: 300 })
    )
    const runIds = await newRuns(5)
    const blocker = await db().reserve()
    try {
      await blocker`begin`
      await blocker`lock table agent_transcript_snapshots in exclusive mode`
      const inFlight = upload(groups, row(runIds[0]!))
      await waitUntil(async () => (await waitingUploads()) === 1, "the first upload's statement waits on the table lock")
      const queued = [upload(groups, row(runIds[1]!)), upload(groups, row(runIds[2]!))]
      expect(groups.queued).toBe(2)
      const overCount = await upload(groups, row(runIds[3]!))
      expect(overCount.error).toBeInstanceOf(UploadsBusy)
      expect((overCount.error as UploadsBusy).reason).toBe("queue full")
      // The deadline: both queued uploads are answered while the table is still locked.
      for (const answer of await Promise.all(queued)) {
        expect((answer.error as UploadsBusy | undefined)?.reason).toBe("queued too long")
      }
      expect(groups.queued).toBe(0)
      expect(groups.queuedSnapshotBytes).toBe(0)
      // By bytes: one upload over the byte bound is admitted into an empty queue, the next is not.
      const big = upload(groups, row(runIds[3]!, "x".repeat(200)))
      expect((await upload(groups, row(runIds[4]!))).error).toBeInstanceOf(UploadsBusy)
      expect(((await big).error as UploadsBusy | undefined)?.reason).toBe("queued too long")
      await blocker`commit`
      expect((await inFlight).id).toBeDefined()
    } finally {
      blocker.release()
    }
    expect(await storedRuns(runIds)).toEqual([runIds[0]])
  })
})
