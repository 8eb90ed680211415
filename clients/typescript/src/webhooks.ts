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

import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";

import type { WebhookEvent } from "./types.js";

export const SECRET_PREFIX = "whsec_";
export const DEFAULT_TOLERANCE_SECONDS = 5 * 60;

/** The request is not a genuine, fresh webhook from the service: answer 400/401. */
export class WebhookVerificationError extends Error {
  override name = "WebhookVerificationError";
}

/** A `whsec_` (or bare base64) secret, or the raw key bytes. */
export type Secret = string | Uint8Array;
export type HeaderSource = Headers | Record<string, string | string[] | undefined>;

function secretKey(secret: Secret): Buffer {
  if (typeof secret !== "string") return Buffer.from(secret);
  const encoded = secret.startsWith(SECRET_PREFIX) ? secret.slice(SECRET_PREFIX.length) : secret;
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(encoded)) throw new Error("webhook secret must be 'whsec_' followed by base64");
  const key = Buffer.from(encoded, "base64");
  if (key.length === 0) throw new Error("webhook secret must not be empty");
  return key;
}

function asBytes(body: string | Uint8Array): Buffer {
  return typeof body === "string" ? Buffer.from(body, "utf8") : Buffer.from(body);
}

function header(headers: HeaderSource, name: string): string | undefined {
  if (typeof (headers as Headers).get === "function") return (headers as Headers).get(name) ?? undefined;
  for (const [key, value] of Object.entries(headers)) {
    if (key.toLowerCase() === name) return Array.isArray(value) ? value[0] : value;
  }
  return undefined;
}

/** A new signing secret: `whsec_` + base64 of 32 random bytes. */
export function generateSecret(bytes = 32): string {
  return SECRET_PREFIX + randomBytes(bytes).toString("base64");
}

/** One `v1,<base64>` signature of `${id}.${timestamp}.${body}`. */
export function signature(secret: Secret, id: string, timestamp: number, body: string | Uint8Array): string {
  if (!id || id.includes(".")) throw new Error("webhook id must be non-empty and must not contain '.'");
  const mac = createHmac("sha256", secretKey(secret));
  mac.update(`${id}.${Math.floor(timestamp)}.`, "utf8");
  mac.update(asBytes(body));
  return `v1,${mac.digest("base64")}`;
}

/** The three Standard Webhooks headers (for tests and for relaying). */
export function sign(secret: Secret, id: string, timestamp: number, body: string | Uint8Array): Record<string, string> {
  return { "webhook-id": id, "webhook-timestamp": String(Math.floor(timestamp)),
           "webhook-signature": signature(secret, id, timestamp, body) };
}

/** Throws WebhookVerificationError unless the headers carry a valid, fresh signature of `body`. */
export function verifySignature(secret: Secret | Secret[], headers: HeaderSource, body: string | Uint8Array,
                                options: { toleranceSeconds?: number; now?: number } = {}): void {
  const id = header(headers, "webhook-id");
  const stamp = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  if (!id || !stamp || !signatures) {
    throw new WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header");
  }
  if (!/^\d+$/.test(stamp)) throw new WebhookVerificationError("webhook-timestamp is not an integer Unix time");
  const timestamp = Number(stamp);
  const now = options.now ?? Date.now() / 1000;
  const tolerance = options.toleranceSeconds ?? DEFAULT_TOLERANCE_SECONDS;
  if (timestamp < now - tolerance) throw new WebhookVerificationError("webhook timestamp is too old");
  if (timestamp > now + tolerance) throw new WebhookVerificationError("webhook timestamp is too new");
  if (id.includes(".")) throw new WebhookVerificationError("webhook id must not contain '.'");
  const received = signatures.split(/\s+/).flatMap((entry) => {
    const [version, encoded] = entry.split(",", 2);
    return version === "v1" && encoded ? [Buffer.from(encoded, "base64")] : [];
  });
  for (const key of Array.isArray(secret) ? secret : [secret]) {
    const expected = Buffer.from(signature(key, id, timestamp, body).slice(3), "base64");
    if (received.some((candidate) => candidate.length === expected.length && timingSafeEqual(candidate, expected))) {
      return;
    }
  }
  throw new WebhookVerificationError("no matching signature");
}

/** Verifies a received webhook and parses it: `{type, timestamp, data: Edit}`. */
export function verifyWebhook(secret: Secret | Secret[], headers: HeaderSource, body: string | Uint8Array,
                              options: { toleranceSeconds?: number; now?: number } = {}): WebhookEvent {
  verifySignature(secret, headers, body, options);
  try {
    return JSON.parse(asBytes(body).toString("utf8")) as WebhookEvent;
  } catch (error) {
    throw new WebhookVerificationError(`signed body is not JSON: ${String(error)}`);
  }
}
