/**
 * The keepalive of one held lock. A loss needs evidence: the connection closed (seen at once, through
 * the pool's close hook), a probe that failed, or a probe that got no answer within `answerWithinMs`
 * of being sent while the event loop was free to read it.
 *
 * Why the last clause: postgres.js writes a query in a setImmediate, so the probe leaves in the next
 * check phase of the event loop, however long the loop is busy before that; the deadline is armed in
 * that same check phase (an immediate queued before postgres.js's own, so it runs just before the
 * write). And after an event-loop stall, Node runs expired timers before it reads sockets, so a deadline
 * timer can fire before an answer that has been waiting in the socket is delivered: a deadline that fires
 * late (the loop was stalled) is re-armed for another full bound, and one that fires on time is judged
 * only after pending I/O has been read (setImmediate runs after the poll phase).
 *
 * Timing: a probe leaves every `keepaliveMs / 2` and must answer within `keepaliveMs / 2`, so a session
 * that dies silently is reported within `keepaliveMs` of its death (plus event-loop delays).
 */
import type { PinnedConnection } from "../db/pinnedConnection.ts"

export class Watchdog {
  private stopped = false
  private timer: ReturnType<typeof setTimeout> | undefined = undefined
  private readonly periodMs: number

  constructor(
    private readonly pinned: PinnedConnection,
    keepaliveMs: number,
    private readonly onLost: (reason: string) => void
  ) {
    this.periodMs = Math.max(1, Math.floor(keepaliveMs / 2))
    pinned.onClosed(() => this.lose("the connection closed"))
    if (!this.stopped) this.wait(() => this.probe(), this.periodMs)
  }

  stop(): void {
    this.stopped = true
    clearTimeout(this.timer)
  }

  private lose(reason: string): void {
    if (this.stopped) return
    this.stop()
    this.onLost(reason)
  }

  private wait(then: () => void, ms: number): void {
    this.timer = setTimeout(then, ms)
    // A held lock must not keep the process alive on its own.
    this.timer.unref()
  }

  private probe(): void {
    if (this.stopped) return
    let answered = false
    this.pinned.query((sql) => sql`select 1`).then(
      () => {
        answered = true
        if (!this.stopped) this.wait(() => this.probe(), this.periodMs)
      },
      () => {
        answered = true
        this.lose(this.pinned.closed ? "the connection closed" : "keepalive failed")
      }
    )
    const armDeadline = () => {
      if (answered || this.stopped) return
      const armedAt = performance.now()
      this.wait(() => {
        if (answered || this.stopped) return
        const lateMs = performance.now() - armedAt - this.periodMs
        if (lateMs > this.periodMs / 2) return armDeadline()
        setImmediate(() => {
          if (!answered) this.lose(`keepalive unanswered within ${this.periodMs} ms`)
        })
      }, this.periodMs)
    }
    setImmediate(armDeadline)
  }
}
