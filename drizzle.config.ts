import { defineConfig } from "drizzle-kit"

// `npm run db:generate` only diffs src/schema against drizzle/meta; it never connects to a database.
export default defineConfig({
  dialect: "postgresql",
  schema: "./src/schema/index.ts",
  out: "./drizzle"
})
