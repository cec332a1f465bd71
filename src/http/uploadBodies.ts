/**
 * Upload bodies being read at once, bounded in bytes: the upload queue (uploadGroups.ts) bounds the
 * snapshots waiting for a statement, but only once their bodies have been read and parsed, so without
 * this bound any number of 25 MB bodies could be read into memory at once. An upload takes its declared
 * Content-Length from the budget before a byte of its body is read (a chunked body takes each chunk as
 * it arrives) and gives it back when its answer is ready. Beyond the budget an upload is answered 503
 * with Retry-After, unread; one upload alone always gets in, whatever its size, as in the queue.
 */
import { Config, Effect, Schema } from "effect"
import { UploadQueueConfigError } from "../snapshots/TranscriptSnapshots.ts"

export const uploadBodiesVariable = "RUNLANE_UPLOAD_BODIES_MAX_BYTES"

/** 256 MiB: ten bodies at the largest a valid snapshot can take, or many thousands of usual ones. */
export const defaultUploadBodiesMaxBytes = 256 * 1024 * 1024

export class UploadBodiesBusy extends Schema.TaggedError<UploadBodiesBusy>()("UploadBodiesBusy", {
  message: Schema.String
}) {}

/** RUNLANE_UPLOAD_BODIES_MAX_BYTES, a positive whole number; a bad value names the variable. */
export const uploadBodiesMaxBytes = Effect.gen(function*() {
  const value = yield* Config.Int(uploadBodiesVariable).pipe(
    Config.withDefault(defaultUploadBodiesMaxBytes),
    Effect.mapError((error) => new UploadQueueConfigError({ variable: uploadBodiesVariable, message: `${uploadBodiesVariable}: ${error.message}` }))
  )
  if (Number.isSafeInteger(value) && value > 0) return value
  return yield* new UploadQueueConfigError({
    variable: uploadBodiesVariable,
    message: `${uploadBodiesVariable}=${value} must be a positive whole number`
  })
})

export interface UploadBody {
  /** Takes `bytes` more for this upload; false (nothing taken) when other uploads hold the budget. */
  readonly take: (bytes: number) => boolean
  /** Gives back everything this upload took. */
  readonly release: () => void
}

export const makeUploadBodies = (maxBytes: number) => {
  let reading = 0
  let readers = 0
  const busy = new UploadBodiesBusy({ message: `upload bodies being read are at their limit of ${maxBytes} bytes` })
  /** One upload's share of the budget. */
  const open = (): UploadBody => {
    let held = 0
    return {
      take: (bytes) => {
        if (bytes === 0) return true
        const others = held > 0 ? readers - 1 : readers
        if (others > 0 && reading + bytes > maxBytes) return false
        if (held === 0) readers++
        held += bytes
        reading += bytes
        return true
      },
      release: () => {
        if (held > 0) readers--
        reading -= held
        held = 0
      }
    }
  }
  return { open, busy, usage: () => ({ reading, readers }) }
}
