import { assert, describe, it } from "vitest"
import { type DemoSummary, metricSum, percentile, summaryText } from "../../src/demo/demoReport.ts"

const text = [
  "# TYPE runlane_runs_deferred_total counter",
  `runlane_runs_deferred_total{queue="demo",reason="lock_cap"} 3`,
  `runlane_runs_deferred_total{queue="demo",reason="conversation_busy"} 4`,
  `runlane_runs_deferred_total{queue="other",reason="lock_cap"} 100`,
  "runlane_conversation_locks_cap_reached_total 7",
  "runlane_conversation_locks_cap_reached_total_extra 1000"
].join("\n")

const summary: DemoSummary = {
  queue: "demo", runs: 10, conversations: 2, elapsedMs: 2_000, enqueuedMs: 500, completed: 10, failed: 0, retries: 1,
  deferrals: { lock_cap: 2, conversation_busy: 0 }, capHits: 2,
  latencyMs: { p50: 10, p90: 20, p99: 30, max: 40 }, maxInFlightPerConversation: 1,
  conversationsOutOfOrder: 0, transcriptProblems: []
}

describe("the demo's report", () => {
  it("sums a metric's samples matching the labels, and no other metric", () => {
    assert.strictEqual(metricSum(text, "runlane_runs_deferred_total", { queue: "demo" }), 7)
    assert.strictEqual(metricSum(text, "runlane_runs_deferred_total", { queue: "demo", reason: "lock_cap" }), 3)
    assert.strictEqual(metricSum(text, "runlane_conversation_locks_cap_reached_total"), 7)
    assert.strictEqual(metricSum(text, "runlane_absent_total"), 0)
  })

  it("takes nearest-rank percentiles", () => {
    const sorted = Array.from({ length: 100 }, (_, i) => i + 1)
    assert.deepStrictEqual([percentile(sorted, 50), percentile(sorted, 90), percentile(sorted, 99), percentile(sorted, 100)], [50, 90, 99, 100])
    assert.strictEqual(percentile([], 50), 0)
    assert.strictEqual(percentile([7], 1), 7)
  })

  it("says ok only when every check held", () => {
    assert.isTrue(summaryText(summary).ok)
    assert.include(summaryText(summary).text, "finished:        10 completed, 0 failed in 2.0 s: 5 runs/s")
    assert.include(summaryText(summary).text, "deferrals:       2 lock_cap")
    assert.isFalse(summaryText({ ...summary, maxInFlightPerConversation: 2 }).ok)
    assert.isFalse(summaryText({ ...summary, conversationsOutOfOrder: 1 }).ok)
    assert.isFalse(summaryText({ ...summary, transcriptProblems: ["conversation-0: turns of runs [2, 1]"] }).ok)
    assert.isFalse(summaryText({ ...summary, completed: 9, failed: 1 }).ok)
  })
})
