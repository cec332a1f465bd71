/** The LISTEN channel for new runs; the payload is the queue name. One channel for every queue, so
 * queue names are not bound by PostgreSQL's 63-byte channel-name limit. */
export const runsChannel = "runlane_runs"

/** The LISTEN channel on which a process refused a conversation as busy asks its keeper to let it go;
 * the payload is the conversation's lock hash (lockKey.ts), so no tenant name goes over it. */
export const conversationWantedChannel = "runlane_conversation_wanted"
