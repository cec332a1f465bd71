/**
 * This process's count of pinned lock connections, by state, against the cap. Pure bookkeeping (time
 * is passed in), so the rules are tested without a database.
 *
 * A connection is counted from the moment an acquire is admitted until its session is known to hold
 * nothing: `inFlight` while it is reserved and locked, `held` while the lock is held, and `stranded`
 * while a session that may still hold a lock is being terminated (its end could not be confirmed). All
 * three count against the cap.
 */
import { NearCapAlarm } from "./lockCap.ts"

export type CountedState = "inFlight" | "held" | "stranded"

export class LockCounter {
  inFlight = 0
  held = 0
  stranded = 0
  private readonly alarm: NearCapAlarm

  constructor(readonly cap: number, warningIntervalMs?: number) {
    this.alarm = new NearCapAlarm(cap, warningIntervalMs)
  }

  get count(): number {
    return this.inFlight + this.held + this.stranded
  }

  get nearCap(): boolean {
    return this.count >= this.alarm.threshold
  }

  /**
   * Admits one acquire as in flight, or answers "full" without changing anything. "warn" when the
   * near-cap warning is due.
   */
  enter(nowMs: number): "admitted" | "warn" | "full" {
    if (this.count >= this.cap) return "full"
    this.inFlight++
    return this.alarm.observe(this.count, true, nowMs) ? "warn" : "admitted"
  }

  move(from: CountedState, to: CountedState): void {
    this[from]--
    this[to]++
  }

  leave(from: CountedState, nowMs: number): void {
    this[from]--
    this.alarm.observe(this.count, false, nowMs)
  }
}
