/**
 * What the UploadGroups tests share: a migrated database of their own with a postgres.js pool that
 * counts the upload statements it sends, runs to upload for, and a promise per upload.
 */
import postgres from "postgres"
import { afterAll, beforeAll } from "vitest"
import type { DatabaseError } from "../../src/db/DatabaseError.ts"
import {
  defaultUploadGroupLimits,
  type UploadGroupLimits,
  type UploadGroups,
  type UploadRow,
  type UploadsBusy
} from "../../src/snapshots/uploadGroups.ts"
import { createDatabase, dropDatabase, type TestDatabaseHandle } from "./testDatabase.ts"

export const scope = { organizationId: "org-g", agentId: "agent-g", conversationId: "conv-g" }
export type Owner = typeof scope

export interface Answer {
  readonly error: DatabaseError | UploadsBusy | undefined
  readonly id: string | undefined
}

export const row = (runId: number, text = `{"run":${runId}}\n`, owner: Owner = scope): UploadRow => ({
  runId,
  ...owner,
  snapshotJsonl: text,
  bytes: Buffer.byteLength(text),
  terminalStatus: "completed"
})

export const upload = (groups: UploadGroups, given: UploadRow): Promise<Answer> =>
  new Promise((resolve) => groups.submit(given, (error, id) => resolve({ error, id })))

export const limits = (overrides: Partial<UploadGroupLimits>): UploadGroupLimits => ({
  ...defaultUploadGroupLimits,
  ...overrides
})

export const waitUntil = async (condition: () => Promise<boolean> | boolean, what: string) => {
  const deadline = Date.now() + 10_000
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 10))
  }
}

/** Registers the file's database (created before its tests, dropped after) and answers its helpers. */
export const uploadGroupsDatabase = (options: Pick<postgres.Options<{}>, "max" | "connection">) => {
  let database: TestDatabaseHandle
  let client: postgres.Sql | undefined
  let statements = 0

  beforeAll(async () => {
    database = await createDatabase({ migrated: true })
    client = postgres(database.url, {
      ...options,
      onnotice: () => {},
      debug: (_connection, query) => {
        if (query.startsWith("insert into agent_transcript_snapshots")) statements++
      }
    })
  })

  afterAll(async () => {
    await client?.end({ timeout: 5 })
    await dropDatabase(database.name)
  })

  const sql = (): postgres.Sql => client!

  return {
    sql,
    url: (): string => database.url,
    /** Upload statements the pool has sent, counted by postgres.js's debug hook. */
    uploadStatements: () => statements,
    newRuns: async (count: number, owner: Owner = scope): Promise<Array<number>> => {
      const rows = await sql()<Array<{ id: string }>>`
        insert into runs (queue, organization_id, agent_id, conversation_id, action_input)
        select 'q', ${owner.organizationId}, ${owner.agentId}, ${owner.conversationId}, '{}'::jsonb
          from generate_series(1, ${count})
        returning id::text`
      return rows.map((stored) => Number(stored.id))
    },
    storedRuns: async (runIds: ReadonlyArray<number>): Promise<Array<number>> =>
      (await sql()<Array<{ id: string }>>`
        select run_id::text as id from agent_transcript_snapshots where run_id in ${sql()(runIds)} order by run_id`)
        .map((stored) => Number(stored.id))
  }
}
