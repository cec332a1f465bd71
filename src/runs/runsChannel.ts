/** The LISTEN channel for new runs; the payload is the queue name. One channel for every queue, so
 * queue names are not bound by PostgreSQL's 63-byte channel-name limit. */
export const runsChannel = "runlane_runs"
