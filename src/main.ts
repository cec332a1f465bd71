/**
 * The runlane service (`npm start`): PostgreSQL (embedded unless `DATABASE_URL` is set), migrations,
 * and the HTTP API on PORT, until SIGINT/SIGTERM, which close everything in order (see service.ts).
 * A bad setting stops it at start, naming the variable.
 */
import { NodeRuntime } from "@effect/platform-node"
import { Layer } from "effect"
import { serviceTeardown } from "./serviceTeardown.ts"
import { makeServiceLayer } from "./service.ts"

NodeRuntime.runMain(Layer.launch(makeServiceLayer()), { teardown: serviceTeardown })
