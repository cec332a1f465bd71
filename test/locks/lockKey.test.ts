import { assert, describe, it } from "@effect/vitest"
import fc from "fast-check"
import { conversationLockHash, defaultLockNamespace, isLockNamespace } from "../../src/locks/lockKey.ts"

// Frozen: every process sharing a database must derive these exact keys. A change here is a breaking
// change of the wire format (two versions during a rollout would both "own" a conversation).
const vectors: ReadonlyArray<readonly [string, string, string, number]> = [
  ["org_x", "agent-x", "conv-A", 1307684488],
  ["org_x", "agent-x", "conv-B", 1358017345],
  ["org_x", "agent-y", "conv-A", 174792859],
  ["org_y", "agent-x", "conv-A", 256001533],
  ["org", "agent", "telegram:6570514069", 912523123],
  ["é", "日本", "🙂", 963889791],
  ["a:b", "c", "d", -920901366],
  ["a", "b:c", "d", -428240078],
  ["", "", "", -499359051]
]

describe("conversation lock keys", () => {
  it("match the committed test vectors", () => {
    for (const [organizationId, agentId, conversationId, expected] of vectors) {
      assert.strictEqual(conversationLockHash({ organizationId, agentId, conversationId }), expected, `${organizationId}/${agentId}/${conversationId}`)
    }
  })

  it("the default namespace is \"rlck\" and fits int4", () => {
    assert.strictEqual(defaultLockNamespace, 1919705963)
    assert.strictEqual(defaultLockNamespace, Buffer.from("rlck").readInt32BE(0))
    assert.isTrue(isLockNamespace(defaultLockNamespace))
    assert.isFalse(isLockNamespace(2 ** 31))
    assert.isFalse(isLockNamespace(1.5))
  })

  it("are signed 32-bit integers for any ids", () => {
    fc.assert(fc.property(fc.string({ unit: "binary" }), fc.string(), fc.string(), (o, a, c) => {
      const hash = conversationLockHash({ organizationId: o, agentId: a, conversationId: c })
      return Number.isInteger(hash) && hash >= -(2 ** 31) && hash < 2 ** 31
    }))
  })

  it("moving a separator between ids changes the encoding (no reference-style ambiguity)", () => {
    // The reference hashed "org:agent:conv", so ("a:b","c","d") and ("a","b:c","d") shared a key.
    fc.assert(fc.property(fc.string(), fc.string(), fc.string(), fc.string(), (a, b, c, d) => {
      const left = conversationLockHash({ organizationId: `${a}:${b}`, agentId: c, conversationId: d })
      const right = conversationLockHash({ organizationId: a, agentId: `${b}:${c}`, conversationId: d })
      // Different encodings; equal hashes would need a 32-bit collision, which these inputs never hit.
      return left !== right
    }), { numRuns: 500, seed: 42 })
  })
})
