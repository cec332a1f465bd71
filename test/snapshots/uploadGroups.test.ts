import postgres from "postgres"
import { describe, expect, it } from "vitest"
import type { DatabaseError } from "../../src/db/DatabaseError.ts"
import { UploadGroups } from "../../src/snapshots/uploadGroups.ts"
import { type Answer, limits, row, scope, upload, uploadGroupsDatabase, waitUntil } from "../support/uploadGroupsHarness.ts"

const { newRuns, sql: db, storedRuns, uploadStatements: sent, url } = uploadGroupsDatabase({ max: 6 })

describe("UploadGroups", () => {
  it("sends uploads submitted together as one statement and answers each its own snapshot id", async () => {
    const groups = new UploadGroups(db())
    const runIds = await newRuns(10)
    const before = sent()
    const answers = await Promise.all(runIds.map((runId) => upload(groups, row(runId))))
    expect(sent() - before).toBe(1)
    expect(answers.every((answer) => answer.error === undefined && answer.id !== undefined)).toBe(true)
    const stored = await db()<Array<{ id: string; run_id: string; snapshot_jsonl: string }>>`
      select id::text, run_id::text, snapshot_jsonl from agent_transcript_snapshots where run_id in ${db()(runIds)}`
    expect(stored).toHaveLength(10)
    for (const [index, runId] of runIds.entries()) {
      const mine = stored.find((candidate) => candidate.id === answers[index]!.id)
      expect(mine?.run_id).toBe(String(runId))
      expect(mine?.snapshot_jsonl).toBe(`{"run":${runId}}\n`)
    }
  })

  it("stores nothing for a row whose run is another scope's, and still stores the rest of its statement", async () => {
    const groups = new UploadGroups(db())
    const [mine, alsoMine] = await newRuns(2)
    const [theirs] = await newRuns(1, { ...scope, organizationId: "org-other" })
    const answers = await Promise.all([upload(groups, row(mine!)), upload(groups, row(theirs!)), upload(groups, row(alsoMine!))])
    expect(answers.map((answer) => answer.id === undefined)).toEqual([false, true, false])
    expect(answers.every((answer) => answer.error === undefined)).toBe(true)
    expect(await storedRuns([mine!, theirs!, alsoMine!])).toEqual([mine, alsoMine])
  })

  it("never puts two uploads for one run in the same statement: one writer wins, the other stores nothing", async () => {
    const groups = new UploadGroups(db())
    const [runId] = await newRuns(1)
    const before = sent()
    const [first, second] = await Promise.all([upload(groups, row(runId!, "first\n")), upload(groups, row(runId!, "second\n"))])
    expect(sent() - before).toBe(2)
    // Both statements may run at once; whichever commits first wins, and only that one gets an id.
    const winners = [first!, second!].filter((answer) => answer.id !== undefined)
    expect(winners).toHaveLength(1)
    expect([first, second].every((answer) => answer!.error === undefined)).toBe(true)
    const stored = await db()`select id::text, snapshot_jsonl from agent_transcript_snapshots where run_id = ${runId!}`
    expect(stored).toHaveLength(1)
    expect(stored[0]!["id"]).toBe(winners[0]!.id)
    expect(stored[0]!["snapshot_jsonl"]).toBe(winners[0] === first ? "first\n" : "second\n")
  })

  it("when PostgreSQL refuses a grouped statement, fails only the bad row and stores the others", async () => {
    const groups = new UploadGroups(db())
    const runIds = await newRuns(4)
    // byte_size must be >= 0 (a CHECK constraint): this row makes the grouped statement fail.
    const bad = { ...row(runIds[2]!), bytes: -1 }
    const before = sent()
    const answers = await Promise.all(runIds.map((runId, index) => upload(groups, index === 2 ? bad : row(runId))))
    expect(sent() - before).toBe(1 + 4)
    expect((answers[2]!.error as DatabaseError | undefined)?.sqlState).toBe("23514")
    expect(answers.filter((answer) => answer.error === undefined && answer.id !== undefined)).toHaveLength(3)
    expect(await storedRuns(runIds)).toEqual(runIds.filter((_, index) => index !== 2))
  })

  it("when a grouped statement fails for another reason (here a statement timeout), fails every upload of it once, without retrying row by row", async () => {
    let statements = 0
    const impatient = postgres(url(), {
      max: 2,
      onnotice: () => {},
      connection: { statement_timeout: 200 },
      debug: (_connection, query) => {
        if (query.startsWith("insert into agent_transcript_snapshots")) statements++
      }
    })
    const blocker = await db().reserve()
    try {
      const groups = new UploadGroups(impatient)
      const runIds = await newRuns(3)
      await blocker`begin`
      await blocker`lock table agent_transcript_snapshots in exclusive mode`
      const answers = await Promise.all(runIds.map((runId) => upload(groups, row(runId))))
      await blocker`commit`
      expect(statements).toBe(1)
      const errors = answers.map((answer) => answer.error as DatabaseError | undefined)
      expect(errors.map((error) => error?.sqlState)).toEqual(["57014", "57014", "57014"])
      expect(errors.every((error) => error?.retryable === true) && answers.every((answer) => answer.id === undefined)).toBe(true)
      expect(await storedRuns(runIds)).toEqual([])
    } finally {
      blocker.release()
      await impatient.end({ timeout: 5 })
    }
  })

  it("keeps to the row and byte bounds of a statement; a snapshot larger than the byte bound goes alone", async () => {
    const groups = new UploadGroups(db(), limits({ maxStatementsInFlight: 1, maxRowsPerStatement: 3, maxBytesPerStatement: 1_000 }))
    const runIds = await newRuns(7)
    let before = sent()
    await Promise.all(runIds.map((runId) => upload(groups, row(runId))))
    expect(sent() - before).toBe(3) // 3 + 3 + 1
    expect(await storedRuns(runIds)).toEqual(runIds)

    const [big, small1, small2] = await newRuns(3)
    before = sent()
    const answers = await Promise.all([
      upload(groups, row(big!, "x".repeat(5_000) + "\n")),
      upload(groups, row(small1!)),
      upload(groups, row(small2!))
    ])
    expect(sent() - before).toBe(2) // the big one alone, then the two small ones
    expect(answers.every((answer) => answer.id !== undefined)).toBe(true)
  })

  it("runs at most maxStatementsInFlight statements; the rest wait and then leave together", async () => {
    const groups = new UploadGroups(db(), limits({ maxStatementsInFlight: 2 }))
    const runIds = await newRuns(5)
    const blocker = await db().reserve()
    try {
      await blocker`begin`
      await blocker`lock table agent_transcript_snapshots in exclusive mode`
      const before = sent()
      const answers: Array<Promise<Answer>> = []
      for (const runId of runIds) {
        answers.push(upload(groups, row(runId)))
        await new Promise((resolve) => setImmediate(resolve)) // separate ticks: no grouping by arrival
      }
      await waitUntil(async () => {
        const [waiting] = await db()<Array<{ count: number }>>`
          select count(*)::int as count from pg_stat_activity
           where datname = current_database() and wait_event_type = 'Lock'
             and query like 'insert into agent_transcript_snapshots%'`
        return waiting!.count === 2
      }, "two upload statements wait on the lock")
      expect(groups.queued).toBe(3)
      expect(sent() - before).toBe(2)
      await blocker`commit`
      const settled = await Promise.all(answers)
      expect(settled.every((answer) => answer.error === undefined && answer.id !== undefined)).toBe(true)
      expect(sent() - before).toBe(3)
      expect(groups.queued).toBe(0)
    } finally {
      blocker.release()
    }
  })

  it("withdraws an upload still queued: it is never stored and never answered", async () => {
    const groups = new UploadGroups(db())
    const [kept, withdrawn] = await newRuns(2)
    let answered = false
    const keptAnswer = upload(groups, row(kept!))
    const queued = groups.submit(row(withdrawn!), () => {
      answered = true
    })
    groups.withdraw(queued!)
    expect((await keptAnswer).id).toBeDefined()
    expect(answered).toBe(false)
    expect(await storedRuns([kept!, withdrawn!])).toEqual([kept])
  })
})
