/**
 * The editserve TypeScript client: types generated from the API's OpenAPI document plus a small wrapper
 * with the Python SDK's verbs. Works in browsers and Node 18+; no runtime dependencies. Webhook
 * verification (Node) is in `@editserve/client/webhooks`.
 */
export * from "./client.js";
export * from "./errors.js";
export * from "./npy.js";
export * from "./sse.js";
export * from "./types.js";
