/** Errors the client throws; API errors carry the server's `type`, `message` and the `field` they name. */
export class EditserveError extends Error {
    name = "EditserveError";
}
/** An HTTP error answer: `field` names the request input at fault (dotted path, e.g. `local_blend.threshold`). */
export class APIError extends EditserveError {
    status;
    type;
    field;
    body;
    retryAfterSeconds;
    name = "APIError";
    constructor(message, status, type, field, body, retryAfterSeconds = null) {
        super(message);
        this.status = status;
        this.type = type;
        this.field = field;
        this.body = body;
        this.retryAfterSeconds = retryAfterSeconds;
    }
}
/** The request never got an HTTP answer (network down, timeout, aborted). */
export class APIConnectionError extends EditserveError {
    name = "APIConnectionError";
}
/** `wait()` ran out of time; `last` is the latest state seen. */
export class WaitTimeout extends EditserveError {
    last;
    name = "WaitTimeout";
    constructor(message, last) {
        super(message);
        this.last = last;
    }
}
/** The edit ended as `failed` (`edit.error` says why) or `canceled`. */
export class EditEnded extends EditserveError {
    edit;
    name = "EditEnded";
    constructor(edit) {
        super(`edit ${edit.id} ${edit.status}${edit.error ? `: ${edit.error.message}` : ""}`);
        this.edit = edit;
    }
}
export class EditFailed extends EditEnded {
    name = "EditFailed";
}
export class EditCanceled extends EditEnded {
    name = "EditCanceled";
}
/** Parses `Retry-After` (seconds or an HTTP date) into seconds, or null. */
export function parseRetryAfter(value) {
    if (!value)
        return null;
    const seconds = Number(value);
    if (Number.isFinite(seconds))
        return Math.max(0, seconds);
    const date = Date.parse(value);
    return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}
/** The server's `{"error": {type, message, field}}` (or FastAPI's `{"detail": ...}`) as an APIError. */
export async function errorFromResponse(response) {
    const text = await response.text().catch(() => "");
    let body = text;
    try {
        body = JSON.parse(text);
    }
    catch {
        // not JSON: keep the text
    }
    let type = "error";
    let message = text.trim() || response.statusText || `HTTP ${response.status}`;
    let field = null;
    const error = body?.error;
    const detail = body?.detail;
    if (error && typeof error === "object") {
        type = error.type || type;
        message = error.message || message;
        field = error.field ?? null;
    }
    else if (Array.isArray(detail) && detail[0] && typeof detail[0] === "object") {
        const first = detail[0];
        const skip = new Set(["body", "query", "path", "p2p", "ip2p"]);
        const loc = (first.loc ?? []).map(String).filter((p) => !skip.has(p));
        type = "invalid_request";
        message = first.msg || message;
        field = loc.length ? loc.join(".") : null;
    }
    else if (typeof detail === "string") {
        message = detail;
    }
    return new APIError(message, response.status, type, field, body, parseRetryAfter(response.headers.get("retry-after")));
}
