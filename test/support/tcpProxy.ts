/**
 * A TCP proxy in front of PostgreSQL that a test can cut: "pass" forwards, "refuse" closes every new
 * connection at once (the server looks unreachable), "blackhole" accepts and never answers. Used for
 * the one-off connections runlane opens to terminate a backend, so a test can make them fail for real.
 */
import net from "node:net"

export type ProxyMode = "pass" | "refuse" | "blackhole"

export interface TcpProxy {
  readonly port: number
  mode: ProxyMode
  /**
   * Closes every client-side socket now, leaving the server-side ones open: the client sees its
   * connections reset while the server sessions live on (a middlebox reset, a client-side timeout).
   */
  readonly cutClients: () => void
  /** Connections accepted so far, whatever the mode. */
  readonly accepted: () => number
  readonly close: () => Promise<void>
}

export const startTcpProxy = (target: { readonly host: string; readonly port: number }): Promise<TcpProxy> =>
  new Promise((resolve, reject) => {
    const sockets = new Set<net.Socket>()
    const pairs = new Set<{ client: net.Socket; upstream: net.Socket }>()
    let accepted = 0
    const track = (socket: net.Socket) => {
      sockets.add(socket)
      socket.on("close", () => sockets.delete(socket))
      socket.on("error", () => socket.destroy())
    }
    const server = net.createServer((client) => {
      accepted++
      track(client)
      if (proxy.mode === "refuse") return void client.destroy()
      if (proxy.mode === "blackhole") return
      const upstream = net.connect(target.port, target.host)
      track(upstream)
      const pair = { client, upstream }
      pairs.add(pair)
      client.pipe(upstream)
      upstream.pipe(client)
      client.on("close", () => pairs.has(pair) && upstream.destroy())
      upstream.on("close", () => client.destroy())
    })
    const proxy: TcpProxy = {
      port: 0,
      mode: "pass",
      accepted: () => accepted,
      cutClients: () => {
        for (const pair of pairs) {
          pairs.delete(pair)
          pair.client.unpipe(pair.upstream)
          pair.upstream.unpipe(pair.client)
          pair.client.destroy()
        }
      },
      close: () =>
        new Promise((done) => {
          for (const socket of sockets) socket.destroy()
          server.close(() => done())
        })
    }
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      ;(proxy as { port: number }).port = (server.address() as net.AddressInfo).port
      resolve(proxy)
    })
  })

/** `url` with its host and port replaced by the proxy's. */
export const throughProxy = (url: string, proxy: TcpProxy): string => {
  const parsed = new URL(url)
  parsed.hostname = "127.0.0.1"
  parsed.port = String(proxy.port)
  return parsed.toString()
}

export const hostAndPort = (url: string): { readonly host: string; readonly port: number } => {
  const parsed = new URL(url)
  return { host: parsed.hostname === "localhost" ? "127.0.0.1" : parsed.hostname, port: Number(parsed.port || 5432) }
}
