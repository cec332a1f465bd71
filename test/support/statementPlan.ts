/**
 * The plan PostgreSQL chooses for one of runlane's statements: `explaining(sql)` is a client that runs
 * `EXPLAIN (FORMAT JSON)` of the statement it is given instead of the statement (fragments made with
 * `unsafe` pass through), and `planOf` reads the answer as a tree of nodes.
 */
import type postgres from "postgres"
import type { RunsClient } from "../../src/runs/sql/runsClient.ts"

export const explaining = (sql: postgres.Sql) =>
  Object.assign((strings: TemplateStringsArray, ...values: Array<unknown>) => {
    const prefixed = [`explain (format json) ${strings[0]}`, ...strings.slice(1)]
    return sql(Object.assign(prefixed, { raw: prefixed }) as unknown as TemplateStringsArray, ...(values as Array<never>))
  }, { unsafe: sql.unsafe.bind(sql) }) as unknown as RunsClient

export interface PlanNode {
  readonly "Node Type": string
  readonly "Index Name"?: string
  readonly Plans?: ReadonlyArray<PlanNode>
}

/** The plan of an explaining client's answer, every node of it. */
export const planNodes = (answer: unknown): Array<PlanNode> => {
  const nodes = (node: PlanNode): Array<PlanNode> => [node, ...(node.Plans ?? []).flatMap(nodes)]
  return nodes((answer as Array<{ "QUERY PLAN": Array<{ Plan: PlanNode }> }>)[0]!["QUERY PLAN"][0]!.Plan)
}

/** The indexes a plan reads, in plan order. */
export const indexesRead = (nodes: ReadonlyArray<PlanNode>): Array<string> =>
  nodes.flatMap((node) => node["Index Name"] === undefined ? [] : [node["Index Name"]])
