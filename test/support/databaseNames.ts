/** Every database the tests create starts with this, so teardown can find leftovers. */
export const testDatabasePrefix = "runlane_test_"

/** The same server URL, pointed at another database. */
export const databaseUrl = (serverUrl: string, database: string): string => {
  const url = new URL(serverUrl)
  url.pathname = `/${database}`
  return url.toString()
}
