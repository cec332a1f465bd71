/**
 * Reading a request body under a byte limit, refusing an oversized one before it is read: a declared
 * `Content-Length` over the limit is refused at once, and a body without one (chunked) is counted as
 * it arrives and refused as soon as it passes the limit. Either way the client gets its 413 while it
 * may still be sending.
 *
 * A declared length must be digits only (`Number` would take "1e3" or "0x10"), and the body read must
 * be exactly that long. Node's HTTP parser holds a body to its declared length; a web fetch handler's
 * Request does not (undici takes any Content-Length beside any body), so the body is read with Effect's
 * MaxBodySize set to the limit: the web request then counts bytes as they arrive and stops at the
 * smaller of its declared length and the limit, so a body that lies about its length is never read
 * past either.
 */
import { ByteSize, Effect, Stream } from "effect"
import { HttpIncomingMessage } from "effect/http"
import type { HttpServerError } from "effect/http/HttpServerError"
import type { HttpServerRequest } from "effect/http/HttpServerRequest"
import { BadRequest, PayloadTooLarge } from "./RunlaneApi.ts"
import { type UploadBody, UploadBodiesBusy } from "./uploadBodies.ts"

const tooLarge = (limitBytes: number) =>
  new PayloadTooLarge({ error: `Request body over the limit of ${limitBytes} bytes` })

const unreadable = new BadRequest({ error: "The request body could not be read" })
const invalidJson = new BadRequest({ error: "Invalid JSON body" })

const utf8 = new TextDecoder("utf-8", { fatal: true })

export const readBodyText = (request: HttpServerRequest, limitBytes: number): Effect.Effect<string, BadRequest | PayloadTooLarge> =>
  readBody(request, limitBytes, undefined) as Effect.Effect<string, BadRequest | PayloadTooLarge>

/**
 * `readBodyText` with the bytes taken from an upload's share of the budget before they are read
 * (uploadBodies.ts): the declared length at once, a chunked body chunk by chunk; refused with `busy`
 * when they cannot be.
 */
export const readBodyTextWithin = (
  request: HttpServerRequest,
  limitBytes: number,
  budget: { readonly body: UploadBody; readonly busy: UploadBodiesBusy }
): Effect.Effect<string, BadRequest | PayloadTooLarge | UploadBodiesBusy> => readBody(request, limitBytes, budget)

interface BodyRead {
  readonly chunks: Array<Uint8Array>
  bytes: number
}

const readBody = (
  request: HttpServerRequest,
  limitBytes: number,
  budget: { readonly body: UploadBody; readonly busy: UploadBodiesBusy } | undefined
): Effect.Effect<string, BadRequest | PayloadTooLarge | UploadBodiesBusy> => {
  const declared = request.headers["content-length"]
  if (declared !== undefined) {
    const length = Number(declared)
    if (!/^[0-9]+$/.test(declared) || !Number.isSafeInteger(length)) {
      return Effect.fail(new BadRequest({ error: "Invalid Content-Length" }))
    }
    if (length > limitBytes) return Effect.fail(tooLarge(limitBytes))
    if (budget !== undefined && !budget.body.take(length)) return Effect.fail(budget.busy)
    const read = request.arrayBuffer.pipe(
      Effect.provideService(HttpIncomingMessage.MaxBodySize, ByteSize.fromInputUnsafe(limitBytes)),
      Effect.mapError((error: HttpServerError) =>
        error.reason._tag === "RequestParseError" && error.reason.reason === "BodyTooLarge" ? tooLarge(limitBytes) : unreadable
      )
    )
    // Never longer than the declared length (MaxBodySize above); a web request's body can be shorter.
    return Effect.flatMap(read, (bytes) =>
      bytes.byteLength !== length
        ? Effect.fail(new BadRequest({ error: `The request body is ${bytes.byteLength} bytes, not its Content-Length of ${length}` }))
        : decodeUtf8(bytes))
  }
  return Stream.runFoldEffect(
    request.stream,
    (): BodyRead => ({ chunks: [], bytes: 0 }),
    (read: BodyRead, chunk: Uint8Array): Effect.Effect<BodyRead, PayloadTooLarge | UploadBodiesBusy> => {
      read.bytes += chunk.byteLength
      if (read.bytes > limitBytes) return Effect.fail(tooLarge(limitBytes))
      if (budget !== undefined && !budget.body.take(chunk.byteLength)) return Effect.fail(budget.busy)
      read.chunks.push(chunk)
      return Effect.succeed(read)
    }
  ).pipe(
    Effect.mapError((error) => error instanceof PayloadTooLarge || error instanceof UploadBodiesBusy ? error : unreadable),
    Effect.flatMap((read) => decodeUtf8(Buffer.concat(read.chunks)))
  )
}

const decodeUtf8 = (bytes: ArrayBuffer | Uint8Array): Effect.Effect<string, BadRequest> => {
  try {
    return Effect.succeed(utf8.decode(bytes))
  } catch {
    return Effect.fail(new BadRequest({ error: "The request body is not valid UTF-8" }))
  }
}

/** The body parsed as JSON: any JSON text becomes a value, anything else is `Invalid JSON body`. */
export const parseJson = (text: string): Effect.Effect<unknown, BadRequest> => {
  try {
    return Effect.succeed(JSON.parse(text))
  } catch {
    return Effect.fail(invalidJson)
  }
}
