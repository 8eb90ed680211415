/** Errors the client throws; API errors carry the server's `type`, `message` and the `field` they name. */

import type { Edit } from "./types.js";

export class EditserveError extends Error {
  override name = "EditserveError";
}

/** An HTTP error answer: `field` names the request input at fault (dotted path, e.g. `local_blend.threshold`). */
export class APIError extends EditserveError {
  override name = "APIError";
  constructor(
    message: string,
    readonly status: number,
    readonly type: string,
    readonly field: string | null,
    readonly body: unknown,
    readonly retryAfterSeconds: number | null = null,
  ) {
    super(message);
  }
}

/** The request never got an HTTP answer (network down, timeout, aborted). */
export class APIConnectionError extends EditserveError {
  override name = "APIConnectionError";
}

/** `wait()` ran out of time; `last` is the latest state seen. */
export class WaitTimeout extends EditserveError {
  override name = "WaitTimeout";
  constructor(message: string, readonly last: Edit | null) {
    super(message);
  }
}

/** The edit ended as `failed` (`edit.error` says why) or `canceled`. */
export class EditEnded extends EditserveError {
  override name = "EditEnded";
  constructor(readonly edit: Edit) {
    super(`edit ${edit.id} ${edit.status}${edit.error ? `: ${edit.error.message}` : ""}`);
  }
}
export class EditFailed extends EditEnded {
  override name = "EditFailed";
}
export class EditCanceled extends EditEnded {
  override name = "EditCanceled";
}

/** Parses `Retry-After` (seconds or an HTTP date) into seconds, or null. */
export function parseRetryAfter(value: string | null): number | null {
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

/** The server's `{"error": {type, message, field}}` (or FastAPI's `{"detail": ...}`) as an APIError. */
export async function errorFromResponse(response: Response): Promise<APIError> {
  const text = await response.text().catch(() => "");
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: keep the text
  }
  let type = "error";
  let message = text.trim() || response.statusText || `HTTP ${response.status}`;
  let field: string | null = null;
  const error = (body as { error?: { type?: string; message?: string; field?: string | null } })?.error;
  const detail = (body as { detail?: unknown })?.detail;
  if (error && typeof error === "object") {
    type = error.type || type;
    message = error.message || message;
    field = error.field ?? null;
  } else if (Array.isArray(detail) && detail[0] && typeof detail[0] === "object") {
    const first = detail[0] as { loc?: unknown[]; msg?: string };
    const skip = new Set(["body", "query", "path", "p2p", "ip2p"]);
    const loc = (first.loc ?? []).map(String).filter((p) => !skip.has(p));
    type = "invalid_request";
    message = first.msg || message;
    field = loc.length ? loc.join(".") : null;
  } else if (typeof detail === "string") {
    message = detail;
  }
  return new APIError(message, response.status, type, field, body, parseRetryAfter(response.headers.get("retry-after")));
}
