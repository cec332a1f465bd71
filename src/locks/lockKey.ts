/**
 * Advisory-lock keys of conversation locks.
 *
 * THIS IS A PERSISTENT WIRE FORMAT: every process sharing the database must derive the same key for
 * the same conversation, including processes of different versions during a rollout. Never change the
 * encoding, the hash or the default namespace; the test vectors in test/locks/lockKey.test.ts pin them.
 *
 * Key = pg_advisory_lock(int4 namespace, int4 hash). The hash is 32-bit FNV-1a over an unambiguous
 * encoding of the three ids: for each of organization, agent, conversation in that order, the UTF-8
 * byte length as 4 bytes big-endian, then the UTF-8 bytes. Unlike the reference's "org:agent:conv",
 * ids that contain a separator cannot collide by shifting it from one id to the next. Two different
 * conversations may still share a 32-bit hash (about 1 in 4 billion per pair); that only ever makes
 * one of them report busy, never lets two holders in.
 */

export interface ConversationKey {
  readonly organizationId: string
  readonly agentId: string
  readonly conversationId: string
}

/** "rlck" in ASCII. The migration lock uses "rlmg", so the two can never meet. */
export const defaultLockNamespace = 0x726c636b

const fnvOffsetBasis = 0x811c9dc5
const fnvPrime = 0x01000193
const encoder = new TextEncoder()

const fnv1a = (hash: number, bytes: Uint8Array): number => {
  let h = hash
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i]!, fnvPrime)
  return h
}

const lengthPrefix = (length: number): Uint8Array =>
  new Uint8Array([(length >>> 24) & 0xff, (length >>> 16) & 0xff, (length >>> 8) & 0xff, length & 0xff])

/** The second int4 of a conversation's advisory lock, as a signed 32-bit integer. */
export const conversationLockHash = (key: ConversationKey): number => {
  let hash = fnvOffsetBasis
  for (const id of [key.organizationId, key.agentId, key.conversationId]) {
    const bytes = encoder.encode(id)
    hash = fnv1a(fnv1a(hash, lengthPrefix(bytes.length)), bytes)
  }
  return hash | 0
}

/** A valid int4 (PostgreSQL `integer`) namespace. */
export const isLockNamespace = (value: number): boolean =>
  Number.isInteger(value) && value >= -2_147_483_648 && value <= 2_147_483_647
