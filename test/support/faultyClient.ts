/**
 * A real postgres.js pool behind a Proxy that injects faults where runlane awaits the database:
 * reserve, the lock query, the unlock, and release. Faults are queued per kind and each is consumed by
 * the next matching call, whoever makes it. Product code never knows: it is handed this pool through
 * `Database.layerFromClient`.
 */
import postgres from "postgres"

export type ReserveFault = "throw" | "late"
/** "throwAfter": the query really ran (the lock may be held) but its answer is lost. */
export type LockFault = "throw" | "throwAfter"
export type UnlockFault = "throw" | "false"
export type ReleaseFault = "throwAfter"

export interface FaultQueues {
  reserve: Array<ReserveFault>
  lock: Array<LockFault>
  unlock: Array<UnlockFault>
  release: Array<ReleaseFault>
  /** How late a "late" reservation arrives, in milliseconds. */
  lateMs: number
}

export interface FaultyClient {
  readonly sql: postgres.Sql
  readonly faults: FaultQueues
  readonly end: () => Promise<void>
}

const injected = (what: string) => Object.assign(new Error(`injected fault: ${what}`), { code: "ECONNRESET" })

const sqlText = (args: ReadonlyArray<unknown>): string => {
  const strings = args[0] as { raw?: unknown } | undefined
  return Array.isArray(strings) && strings !== undefined && Array.isArray(strings.raw) ? strings.join("?") : ""
}

export const makeFaultyClient = (url: string, poolMax: number, applicationName: string): FaultyClient => {
  const real = postgres(url, { max: poolMax, onnotice: () => {}, connection: { application_name: applicationName } })
  const faults: FaultQueues = { reserve: [], lock: [], unlock: [], release: [], lateMs: 0 }

  const wrapReserved = (reserved: postgres.ReservedSql): postgres.ReservedSql =>
    new Proxy(reserved, {
      apply(target, thisArg, args: Array<unknown>) {
        const text = sqlText(args)
        if (text.includes("pg_try_advisory_lock") && faults.lock.length > 0) {
          const fault = faults.lock.shift()!
          if (fault === "throw") return Promise.reject(injected("lock query"))
          return Promise.resolve(Reflect.apply(target, thisArg, args)).then(() => {
            throw injected("lock answer lost")
          })
        }
        if (text.includes("pg_advisory_unlock") && faults.unlock.length > 0) {
          const fault = faults.unlock.shift()!
          return fault === "throw" ? Promise.reject(injected("unlock")) : Promise.resolve([{ unlocked: false }])
        }
        return Reflect.apply(target, thisArg, args)
      },
      get(target, property, receiver) {
        if (property === "release") {
          return () => {
            target.release()
            if (faults.release.shift() === "throwAfter") throw injected("release")
          }
        }
        return Reflect.get(target, property, receiver)
      }
    })

  const sql = new Proxy(real, {
    get(target, property, receiver) {
      if (property === "reserve") {
        return async () => {
          const fault = faults.reserve.shift()
          if (fault === "throw") throw injected("reserve")
          const reserved = await target.reserve()
          if (fault === "late") await new Promise((resolve) => setTimeout(resolve, faults.lateMs))
          return wrapReserved(reserved)
        }
      }
      return Reflect.get(target, property, receiver)
    }
  })
  return { sql, faults, end: () => real.end({ timeout: 5 }) }
}
