/**
 * The service of `npm start`, plus one conversation lock held for its whole life (as a worker inside
 * the process would hold one), to prove that shutdown releases it before the process exits.
 */
import { Effect, Layer } from "effect"
import { ConversationLocks } from "../../src/locks/ConversationLocks.ts"
import { launchService } from "../../src/service.ts"
import { runServiceMain, serviceTeardown } from "../../src/serviceRuntime.ts"

export const heldConversation = { organizationId: "org", agentId: "agent", conversationId: "held-at-shutdown" }

const holdOneLock = Layer.effectDiscard(Effect.gen(function*() {
  const locks = yield* ConversationLocks
  // Registered before the lock, so it runs after the lock's own release.
  yield* Effect.addFinalizer(() =>
    Effect.flatMap(locks.localUsage, (usage) =>
      Effect.logInfo(`test holder: released; reserved=${usage.held + usage.inFlight}`))
  )
  const lock = yield* locks.acquire(heldConversation)
  yield* Effect.logInfo(`test holder: holding the lock on backend ${lock.backendPid}`)
}))

runServiceMain(launchService(holdOneLock), { teardown: serviceTeardown })
