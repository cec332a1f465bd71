/**
 * A real postgres.js pool behind a Proxy that injects faults where runlane awaits the database:
 * reserve, the pinned connection's first query (pid and lock), each unlock, the keepalive, and release.
 * Faults are queued per point and each is consumed by the next matching call, whoever makes it; every
 * fault that fires is recorded in `fired`, so a test can assert that its fault really happened. Product
 * code never knows: it is handed this pool through `Database.layerFromClient`.
 *
 * A hung or lost answer keeps the real query object (a Proxy overriding only `then`), so postgres.js's
 * own record of the session stays readable, as it would be for a real hang.
 */
import postgres from "postgres"

/** "late": the connection arrives `lateMs` after the pool handed it over, past any reserve timeout. */
export type ReserveFault = "throw" | "late"
/**
 * "throw": rejected before anything is sent. "answerLost": the query ran (the lock may be held) and its
 * answer is replaced by an error. "hang": it ran, and its answer never comes. "malformed": it ran, and
 * the answer's `locked` column is null. "slow": it ran, and its answer arrives `lateMs` late.
 */
export type FirstQueryFault = "throw" | "answerLost" | "hang" | "malformed" | "slow"
/** "false": answers "not held" without sending anything. "hang": never answers, sends nothing. */
export type UnlockFault = "throw" | "false" | "hang"
/**
 * "stall": the event loop is blocked for `stallMs` just after the probe is written, while its answer
 * arrives. "stallBeforeWrite": blocked for `stallMs` after the probe is created and before postgres.js
 * writes it; its answer then takes 3 ms more, as over any real network.
 */
export type KeepaliveFault = "stall" | "stallBeforeWrite" | "hang"
export type ReleaseFault = "throwAfter"

export interface FaultQueues {
  reserve: Array<ReserveFault>
  firstQuery: Array<FirstQueryFault>
  unlock: Array<UnlockFault>
  keepalive: Array<KeepaliveFault>
  release: Array<ReleaseFault>
  lateMs: number
  stallMs: number
  /** "point:fault" for every fault that fired, in order. */
  readonly fired: Array<string>
}

export interface FaultyClient {
  readonly sql: postgres.Sql
  readonly faults: FaultQueues
  readonly clear: () => void
  readonly end: () => Promise<void>
}

const injected = (what: string) => Object.assign(new Error(`injected fault: ${what}`), { code: "ECONNRESET" })

const sqlText = (args: ReadonlyArray<unknown>): string => {
  const strings = args[0] as { raw?: unknown } | undefined
  return Array.isArray(strings) && strings !== undefined && Array.isArray(strings.raw) ? strings.join("?") : ""
}

/** Blocks the event loop: what a long synchronous handler does to every timer and socket. */
const stallEventLoop = (ms: number) => {
  const until = performance.now() + ms
  while (performance.now() < until) {
    // Busy on purpose.
  }
}

const never = new Promise<never>(() => {})

/** The real query, sent, with its `then` answering `settle` instead. */
const withAnswer = <Q extends PromiseLike<unknown>>(
  query: Q,
  settle: (real: Promise<unknown>) => Promise<unknown>
): Q =>
  new Proxy(query, {
    get(target, property, receiver) {
      if (property !== "then") return Reflect.get(target, property, receiver)
      return (onFulfilled: (value: unknown) => unknown, onRejected: (error: unknown) => unknown) =>
        settle(new Promise((resolve, reject) => target.then(resolve, reject))).then(onFulfilled, onRejected)
    }
  })

export const makeFaultyClient = (url: string, poolMax: number, applicationName?: string): FaultyClient => {
  const real = postgres(url, {
    max: poolMax,
    onnotice: () => {},
    ...(applicationName === undefined ? {} : { connection: { application_name: applicationName } })
  })
  const faults: FaultQueues = { reserve: [], firstQuery: [], unlock: [], keepalive: [], release: [], lateMs: 0, stallMs: 0, fired: [] }
  const take = <F extends string>(point: string, queue: Array<F>): F | undefined => {
    const fault = queue.shift()
    if (fault !== undefined) faults.fired.push(`${point}:${fault}`)
    return fault
  }

  const firstQuery = (query: PromiseLike<Array<Record<string, unknown>>>) => {
    switch (take("firstQuery", faults.firstQuery)) {
      case "throw": return Promise.reject(injected("first query"))
      case "answerLost": return withAnswer(query, (answer) => answer.then(() => Promise.reject(injected("lock answer lost"))))
      case "hang": return withAnswer(query, (answer) => answer.then(() => never))
      case "malformed": return withAnswer(query, (answer) => answer.then((rows) => (rows as Array<object>).map((row) => ({ ...row, locked: null }))))
      case "slow": return withAnswer(query, (answer) => answer.then((rows) => new Promise((resolve) => setTimeout(() => resolve(rows), faults.lateMs))))
      default: return query
    }
  }

  const wrapReserved = (reserved: postgres.ReservedSql): postgres.ReservedSql =>
    new Proxy(reserved, {
      apply(target, thisArg, args: Array<unknown>) {
        const text = sqlText(args)
        if (text.includes("pg_advisory_unlock")) {
          const fault = take("unlock", faults.unlock)
          if (fault === "throw") return Promise.reject(injected("unlock"))
          if (fault === "false") return Promise.resolve([{ unlocked: false }])
          if (fault === "hang") return never
        }
        if (text.includes("pg_try_advisory_lock")) return firstQuery(Reflect.apply(target, thisArg, args) as PromiseLike<Array<Record<string, unknown>>>)
        if (text.trim() === "select 1") {
          const fault = take("keepalive", faults.keepalive)
          const query = Reflect.apply(target, thisArg, args) as PromiseLike<unknown>
          if (fault === "hang") return withAnswer(query, (answer) => answer.then(() => never))
          if (fault === "stallBeforeWrite") {
            queueMicrotask(() => stallEventLoop(faults.stallMs))
            return withAnswer(query, (answer) => answer.then((rows) => new Promise((resolve) => setTimeout(() => resolve(rows), 3))))
          }
          if (fault === "stall") {
            // Two turns of the loop: the first lets postgres.js write the probe, the second stalls
            // while its answer arrives and waits, unread, in the socket.
            setImmediate(() => setImmediate(() => stallEventLoop(faults.stallMs)))
          }
          return query
        }
        return Reflect.apply(target, thisArg, args)
      },
      get(target, property, receiver) {
        if (property === "release") {
          return () => {
            target.release()
            if (take("release", faults.release) === "throwAfter") throw injected("release")
          }
        }
        if (property === "unsafe") {
          return (text: string, parameters: Array<unknown>, options: object) => {
            const query = target.unsafe(text, parameters as Array<never>, options)
            // Every pinned connection's first query identifies it this way (see pinnedConnection.ts).
            return text.includes("as pinned_at") ? firstQuery(query) : query
          }
        }
        return Reflect.get(target, property, receiver)
      }
    })

  const sql = new Proxy(real, {
    get(target, property, receiver) {
      if (property === "reserve") {
        return async () => {
          const fault = take("reserve", faults.reserve)
          if (fault === "throw") throw injected("reserve")
          const reserved = await target.reserve()
          if (fault === "late") await new Promise((resolve) => setTimeout(resolve, faults.lateMs))
          return wrapReserved(reserved)
        }
      }
      return Reflect.get(target, property, receiver)
    }
  })
  const clear = () => {
    faults.reserve.length = faults.firstQuery.length = faults.unlock.length = 0
    faults.keepalive.length = faults.release.length = faults.fired.length = 0
  }
  return { sql, faults, clear, end: () => real.end({ timeout: 5 }) }
}
