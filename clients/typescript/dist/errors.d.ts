/** Errors the client throws; API errors carry the server's `type`, `message` and the `field` they name. */
import type { Edit } from "./types.js";
export declare class EditserveError extends Error {
    name: string;
}
/** An HTTP error answer: `field` names the request input at fault (dotted path, e.g. `local_blend.threshold`). */
export declare class APIError extends EditserveError {
    readonly status: number;
    readonly type: string;
    readonly field: string | null;
    readonly body: unknown;
    readonly retryAfterSeconds: number | null;
    name: string;
    constructor(message: string, status: number, type: string, field: string | null, body: unknown, retryAfterSeconds?: number | null);
}
/** The request never got an HTTP answer (network down, timeout, aborted). */
export declare class APIConnectionError extends EditserveError {
    name: string;
}
/** `wait()` ran out of time; `last` is the latest state seen. */
export declare class WaitTimeout extends EditserveError {
    readonly last: Edit | null;
    name: string;
    constructor(message: string, last: Edit | null);
}
/** The edit ended as `failed` (`edit.error` says why) or `canceled`. */
export declare class EditEnded extends EditserveError {
    readonly edit: Edit;
    name: string;
    constructor(edit: Edit);
}
export declare class EditFailed extends EditEnded {
    name: string;
}
export declare class EditCanceled extends EditEnded {
    name: string;
}
/** Parses `Retry-After` (seconds or an HTTP date) into seconds, or null. */
export declare function parseRetryAfter(value: string | null): number | null;
/** The server's `{"error": {type, message, field}}` (or FastAPI's `{"detail": ...}`) as an APIError. */
export declare function errorFromResponse(response: Response): Promise<APIError>;
