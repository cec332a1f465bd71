import { randomUUID } from "node:crypto"
import { assert, layer } from "@effect/vitest"
import { Context, Effect, Fiber, Layer } from "effect"
import { Database } from "../../src/db/Database.ts"
import { RunsQueue, type ClaimedRun } from "../../src/runs/RunsQueue.ts"
import { runClaimAvailable } from "../../src/runs/sql/runClaimAvailable.ts"
import { auditConversations, installClaimAudit } from "../support/claimAudit.ts"
import { freshQueue, movableClock, readRun, runInput, runsTestLayer } from "../support/runsHarness.ts"

const clock = movableClock()

const inConversation = (q: string, conversationId: string, extra: Parameters<typeof runInput>[1] = {}) =>
  runInput(q, { agentId: "agent-1", conversationId, ...extra })

/** Another RunsQueue (its own claimant, its own pool) on the same database: a second process, in effect. */
const secondQueue = (options: { readonly now?: () => Date } = {}) =>
  Effect.gen(function*() {
    const { url } = yield* Database
    const context = yield* Layer.build(
      RunsQueue.layerWith(options).pipe(Layer.provide(Database.layerWith({ url, poolMax: 4 })))
    )
    return Context.get(context, RunsQueue)
  })

const ids = (runs: ReadonlyArray<ClaimedRun>) => runs.map((run) => run.id)

/**
 * Two claimers of one conversation whose clocks disagree on whether its oldest run has expired.
 * Claimer A (on the start clock) claims the first run in a transaction it keeps open; claimer B (1 ms
 * later, for which the first run has expired and the second is the oldest) runs `claimOfB`, whose
 * statement waits on A's uncommitted entry in runs_conversation_claimed_uniq (seen in pg_stat_activity);
 * then A commits and B's answer is returned.
 */
const claimersOnDisagreeingClocks = <A, E>(
  name: string,
  claimOfB: (other: RunsQueue["Service"], q: string) => Effect.Effect<A, E>
) =>
  Effect.gen(function*() {
    const queue = yield* RunsQueue
    const { sql, use } = yield* Database
    const q = freshQueue(name)
    const start = clock.now().getTime()
    const [first, second] = yield* queue.sendMany([
      inConversation(q, "c", { expiresAt: new Date(start + 1) }),
      inConversation(q, "c")
    ])
    const tx = yield* Effect.promise(() => sql.reserve())
    yield* Effect.addFinalizer(() => Effect.sync(() => tx.release()))
    yield* Effect.promise(() => tx`begin`)
    const claimedByA = yield* Effect.promise(() =>
      runClaimAvailable(tx, { queue: q, limit: 10, claimant: "claimer-a", leaseMs: 60_000, now: new Date(start).toISOString(), claimId: randomUUID() }))
    assert.deepStrictEqual(claimedByA.map((row) => Number(row.id)), [first!.id])
    const other = yield* secondQueue({ now: () => new Date(start + 1) })
    const claimB = yield* Effect.forkChild(claimOfB(other, q))
    for (let polls = 0; ; polls++) {
      const [row] = yield* use("test.waiting", (pool) =>
        pool<Array<{ n: number }>>`
          select count(*)::int as n from pg_stat_activity
           where datname = current_database() and wait_event_type = 'Lock' and query like '%candidates%'`)
      if (row!.n > 0) break
      assert.isBelow(polls, 500, "claimer B never waited on claimer A")
      yield* Effect.promise(() => new Promise((resolve) => setTimeout(resolve, 10)))
    }
    yield* Effect.promise(() => tx`commit`)
    return { first: first!, second: second!, answerOfB: yield* Fiber.join(claimB) }
  })

layer(runsTestLayer(clock), { excludeTestServices: true })("RunsQueue.claim and conversations", (it) => {
  it.effect("takes only a conversation's oldest pending run, and only while none of its runs is claimed", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("order")
      const [c1, c2, c3, d1, free] = yield* queue.sendMany([
        inConversation(q, "c"),
        // A higher priority does not let a conversation's later run overtake its earlier one.
        inConversation(q, "c", { priority: 10 }),
        inConversation(q, "c"),
        inConversation(q, "d"),
        runInput(q)
      ])
      assert.sameMembers(ids(yield* queue.claim(q, { limit: 10 })), [c1!.id, d1!.id, free!.id])
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [])
      yield* queue.complete({ id: c1!.id })
      const [next] = yield* queue.claim(q, { limit: 10 })
      assert.strictEqual(next?.id, c2!.id)
      // A deferral (the conversation was busy) keeps the run first in line.
      yield* queue.defer(next!, 5_000)
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [])
      clock.advance(5_000)
      assert.deepStrictEqual(ids(yield* queue.claim(q, { limit: 10 })), [c2!.id])
      yield* queue.release({ id: c2!.id })
      assert.deepStrictEqual(ids(yield* queue.claim(q, { limit: 10 })), [c2!.id])
      yield* queue.complete({ id: c2!.id })
      assert.deepStrictEqual(ids(yield* queue.claim(q, { limit: 10 })), [c3!.id])
    }))

  it.effect("completeManyAndClaim: a conversation's next run is not claimed by the call that completes its run, but by the next", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("complete-and-claim-order")
      const [c1, c2, d1] = yield* queue.sendMany([inConversation(q, "c"), inConversation(q, "c"), inConversation(q, "d")])
      const [first] = yield* queue.claim(q, { limit: 1 })
      assert.strictEqual(first?.id, c1!.id)
      // The statement's snapshot still sees c1 claimed: c2 must wait, d1 is free.
      const { completed, claimed } = yield* queue.completeManyAndClaim([first!], q, { limit: 10 })
      assert.deepStrictEqual(completed.settled, [c1!.id])
      assert.deepStrictEqual(ids(claimed), [d1!.id])
      const next = yield* queue.completeManyAndClaim(claimed, q, { limit: 10 })
      assert.deepStrictEqual(ids(next.claimed), [c2!.id])
    }))

  it.effect("a conversation is the organization, agent and conversation id together", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("scope")
      const sent = yield* queue.sendMany([
        inConversation(q, "c"),
        inConversation(q, "c", { agentId: "agent-2" }),
        inConversation(q, "c", { agentId: undefined }),
        inConversation(q, "c", { organizationId: "org-2" }),
        inConversation(q, "c", { agentId: undefined })
      ])
      assert.sameMembers(ids(yield* queue.claim(q, { limit: 10 })), sent.slice(0, 4).map((run) => run.id))
    }))

  it.effect("an expired run does not block its conversation; a failed one waiting to retry does", () =>
    Effect.gen(function*() {
      const queue = yield* RunsQueue
      const q = freshQueue("expired")
      const start = clock.now().getTime()
      const [expiring, second, third] = yield* queue.sendMany([
        inConversation(q, "c", { expiresAt: new Date(start + 1_000) }),
        inConversation(q, "c", { retryDelaySeconds: 60 }),
        inConversation(q, "c")
      ])
      clock.advance(1_000)
      const [claimed] = yield* queue.claim(q, { limit: 10 })
      assert.strictEqual(claimed?.id, second!.id)
      assert.strictEqual((yield* readRun(expiring!.id)).status, "pending")
      yield* queue.fail(claimed!, "retry me")
      assert.deepStrictEqual(yield* queue.claim(q, { limit: 10 }), [], "the third run waits for the second's retry")
      clock.advance(60_000)
      assert.deepStrictEqual(ids(yield* queue.claim(q, { limit: 10 })), [second!.id])
      yield* queue.complete({ id: second!.id })
      assert.deepStrictEqual(ids(yield* queue.claim(q, { limit: 10 })), [third!.id])
    }))

  it.effect("two claimers whose clocks disagree on an expiry: the later one waits and gets nothing rather than a second run", () =>
    Effect.scoped(Effect.gen(function*() {
      const { second, answerOfB } = yield* claimersOnDisagreeingClocks("clocks", (other, q) => other.claim(q, { limit: 10 }))
      assert.deepStrictEqual(answerOfB, [])
      assert.strictEqual((yield* readRun(second.id)).status, "pending")
    })))

  it.effect("a claim that also completes, refused by the conversation index, runs again whole: its run is completed, once", () =>
    Effect.scoped(Effect.gen(function*() {
      let finished: ClaimedRun | undefined
      const { answerOfB } = yield* claimersOnDisagreeingClocks("clocks-completing", (other, q) =>
        Effect.gen(function*() {
          const elsewhere = freshQueue("clocks-completing-elsewhere")
          yield* other.send(runInput(elsewhere))
          finished = (yield* other.claim(elsewhere, { limit: 1 }))[0]
          return yield* other.completeManyAndClaim([finished!], q, { limit: 10 })
        }))
      // The first statement, completion included, rolled back on unique_violation; the second did both.
      assert.deepStrictEqual(answerOfB, { completed: { settled: [finished!.id], cancelled: [], lost: [] }, claimed: [] })
      assert.strictEqual((yield* readRun(finished!.id)).status, "completed")
    })))

  it.effect("two claimers racing over many conversations never hold two runs of one conversation (audited in the database)", () =>
    Effect.scoped(Effect.gen(function*() {
      yield* installClaimAudit
      // Both on the database clock, as separate processes would be.
      const a = yield* secondQueue()
      const b = yield* secondQueue()
      const rounds = 15
      for (let round = 0; round < rounds; round++) {
        const q = freshQueue("race")
        const inputs = Array.from({ length: 24 }, (_, i) =>
          i % 6 === 5 ? runInput(q) : inConversation(q, `conv-${round}-${i % 4}`))
        const sent = yield* a.sendMany(inputs)
        let remaining = sent.length
        const violations: Array<string> = []
        const held = new Map<string, string>()
        const worker = (claimer: RunsQueue["Service"], name: string) =>
          Effect.gen(function*() {
            while (remaining > 0) {
              const runs = yield* claimer.claim(q, { limit: 3 })
              for (const run of runs) {
                if (run.conversationId === null) continue
                const holder = held.get(run.conversationId)
                if (holder !== undefined) violations.push(`${name} got ${run.conversationId} held by ${holder}`)
                held.set(run.conversationId, name)
              }
              yield* Effect.yieldNow
              // Let go of the conversations before the settle is sent: a claim that sees the settle
              // committed can only return after this.
              for (const run of runs) if (run.conversationId !== null) held.delete(run.conversationId)
              const outcome = yield* claimer.completeMany(runs)
              assert.deepStrictEqual(outcome.lost, [])
              remaining -= runs.length
            }
          })
        yield* Effect.all([worker(a, "a"), worker(b, "b")], { concurrency: 2 })
        assert.deepStrictEqual(violations, [])
      }
      const audit = yield* auditConversations
      assert.deepStrictEqual(audit.problems, [])
      assert.strictEqual(audit.claims, rounds * 20)
    })))
})
