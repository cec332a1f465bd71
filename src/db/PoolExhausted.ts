/** No pool connection became free for a pinned holder within the reserve timeout. */
import { Schema } from "effect"

export class PoolExhausted extends Schema.TaggedError<PoolExhausted>()("PoolExhausted", {
  timeoutMs: Schema.Number,
  poolMax: Schema.Number
}) {}
