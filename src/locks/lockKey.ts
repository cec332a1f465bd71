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

/** FNV-1a over the 4-byte big-endian length, without allocating the 4 bytes. */
const fnv1aLength = (hash: number, length: number): number => {
  let h = Math.imul(hash ^ ((length >>> 24) & 0xff), fnvPrime)
  h = Math.imul(h ^ ((length >>> 16) & 0xff), fnvPrime)
  h = Math.imul(h ^ ((length >>> 8) & 0xff), fnvPrime)
  return Math.imul(h ^ (length & 0xff), fnvPrime)
}

/** An ASCII id is its own UTF-8: hashed from its char codes without encoding (the common case). */
const hashId = (hash: number, id: string): number => {
  for (let i = 0; i < id.length; i++) {
    if (id.charCodeAt(i) > 0x7f) {
      const bytes = encoder.encode(id)
      return fnv1a(fnv1aLength(hash, bytes.length), bytes)
    }
  }
  let h = fnv1aLength(hash, id.length)
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), fnvPrime)
  return h
}

/** The second int4 of a conversation's advisory lock, as a signed 32-bit integer. */
export const conversationLockHash = (key: ConversationKey): number =>
  hashId(hashId(hashId(fnvOffsetBasis, key.organizationId), key.agentId), key.conversationId) | 0

/** A valid int4 (PostgreSQL `integer`) namespace. */
export const isLockNamespace = (value: number): boolean =>
  Number.isInteger(value) && value >= -2_147_483_648 && value <= 2_147_483_647
