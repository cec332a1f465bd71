import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["./test/support/globalSetup.ts"],
    // Each file gets its own database cloned from a migrated template, so files may run in parallel.
    testTimeout: 60_000,
    hookTimeout: 120_000
  }
})
