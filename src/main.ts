/**
 * The runlane service (`npm start`): PostgreSQL (embedded unless `DATABASE_URL` is set), migrations,
 * and the HTTP API on PORT, until SIGINT, SIGTERM or SIGHUP, which close everything in order (see
 * service.ts), or until the embedded database dies (exit code 1).
 * A bad setting stops it at start, naming the variable.
 */
import { launchService } from "./service.ts"
import { runServiceMain, serviceTeardown } from "./serviceRuntime.ts"

runServiceMain(launchService(), { teardown: serviceTeardown })
