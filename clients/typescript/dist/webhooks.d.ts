/**
 * Standard Webhooks v1 verification for Node (HMAC-SHA256 via `node:crypto`), byte-compatible with the
 * server's signer: the signed content is `${webhook-id}.${webhook-timestamp}.${raw body}`, the
 * `webhook-signature` header holds space-separated `v1,<base64>` entries (several while a key rotates), and
 * timestamps older or newer than the tolerance (5 minutes) are refused to block replays.
 *
 *     import { verifyWebhook } from "@editserve/client/webhooks";
 *     const event = verifyWebhook(process.env.EDITSERVE_WEBHOOK_SECRET!, req.headers, rawBody);
 *
 * Pass the raw body exactly as received (never re-serialised JSON); deduplicate on `webhook-id`.
 */
import type { WebhookEvent } from "./types.js";
export declare const SECRET_PREFIX = "whsec_";
export declare const DEFAULT_TOLERANCE_SECONDS: number;
/** The request is not a genuine, fresh webhook from the service: answer 400/401. */
export declare class WebhookVerificationError extends Error {
    name: string;
}
/** A `whsec_` (or bare base64) secret, or the raw key bytes. */
export type Secret = string | Uint8Array;
export type HeaderSource = Headers | Record<string, string | string[] | undefined>;
/** A new signing secret: `whsec_` + base64 of 32 random bytes. */
export declare function generateSecret(bytes?: number): string;
/** One `v1,<base64>` signature of `${id}.${timestamp}.${body}`. */
export declare function signature(secret: Secret, id: string, timestamp: number, body: string | Uint8Array): string;
/** The three Standard Webhooks headers (for tests and for relaying). */
export declare function sign(secret: Secret, id: string, timestamp: number, body: string | Uint8Array): Record<string, string>;
/** Throws WebhookVerificationError unless the headers carry a valid, fresh signature of `body`. */
export declare function verifySignature(secret: Secret | Secret[], headers: HeaderSource, body: string | Uint8Array, options?: {
    toleranceSeconds?: number;
    now?: number;
}): void;
/** Verifies a received webhook and parses it: `{type, timestamp, data: Edit}`. */
export declare function verifyWebhook(secret: Secret | Secret[], headers: HeaderSource, body: string | Uint8Array, options?: {
    toleranceSeconds?: number;
    now?: number;
}): WebhookEvent;
