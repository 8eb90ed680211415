/**
 * `EditserveClient`: the Python SDK's verbs (submit P2P / IP2P, get, list, cancel, models, stream, wait) over
 * `fetch`, for browsers and Node 18+, with no runtime dependencies.
 *
 * Why it looks like this: every request is described once and sent unchanged on retry, so a retried submit
 * carries the same `Idempotency-Key` and can never create a second edit. Retries cover network errors and
 * 429/502/503/504 (honouring `Retry-After`). `wait()` follows the SSE stream (fetch + ReadableStream, so the
 * API key stays in a header, never in a URL) and falls back to polling. Result URLs are presigned: they are
 * fetched without the API key.
 */
import { type Edit, type EditList, type EditRequest, type EditStatus, type IP2PEditRequest, type ModelInfo, type P2PEditRequest } from "./types.js";
export declare const API_VERSION = "v1";
export interface ClientOptions {
    /** Gateway URL. Default: `$EDITSERVE_URL` in Node, the page's origin in a browser, else 127.0.0.1:8000. */
    baseUrl?: string;
    /** API key, sent as `Authorization: Bearer`. Default: `$EDITSERVE_API_KEY` in Node. */
    apiKey?: string;
    /** Per-request timeout (ms) for ordinary calls; streams are bounded by `wait()`'s timeout. */
    timeoutMs?: number;
    /** Extra attempts after a network error or a 429/502/503/504. */
    retries?: number;
    headers?: Record<string, string>;
    /** A fetch implementation (tests, proxies); default the global one. */
    fetch?: typeof fetch;
}
export interface SubmitOptions {
    /** Same key + same body → the same edit, run once. Default: a fresh random key per call (kept across retries). */
    idempotencyKey?: string;
    /** `Prefer: wait=N`: the server holds the answer up to N seconds. */
    wait?: number;
    signal?: AbortSignal;
}
/** An image as bytes: a Blob/File (browser), or an ArrayBuffer / typed array (Node). */
export type ImageInput = Blob | ArrayBuffer | ArrayBufferView;
export type P2POptions = Omit<P2PEditRequest, "kind" | "source_prompt" | "target_prompts"> & SubmitOptions;
export type IP2POptions = Omit<IP2PEditRequest, "kind" | "instruction" | "image"> & SubmitOptions & {
    filename?: string;
};
export interface ListFilters {
    status?: EditStatus;
    kind?: "p2p" | "ip2p";
    model?: string;
    limit?: number;
    cursor?: string;
    signal?: AbortSignal;
}
export interface WaitOptions {
    /** Give up after this many ms (WaitTimeout); default: no limit. */
    timeoutMs?: number;
    /** Called with every state the server publishes: queue position, `progress.step/total`, status. */
    onProgress?: (edit: Edit) => void;
    /** Polling interval when the events route is unavailable. */
    pollIntervalMs?: number;
    signal?: AbortSignal;
}
/** One API request, as `json()` sends it (retried unchanged). */
export interface ApiCall {
    method: string;
    path: string;
    query?: Record<string, string | number | undefined>;
    json?: unknown;
    form?: FormData;
    headers?: Record<string, string>;
    signal?: AbortSignal;
    /** false: no per-request timeout (streams) */
    timeout?: boolean;
}
export declare class EditserveClient {
    readonly baseUrl: string;
    readonly timeoutMs: number;
    readonly retries: number;
    private readonly apiKey;
    private readonly headers;
    private readonly fetchImpl;
    constructor(options?: ClientOptions);
    /** Any edit request; an `image` goes as a multipart file (IP2P). Returns the edit as the server answered. */
    submit(request: EditRequest, options?: SubmitOptions & {
        image?: ImageInput;
        filename?: string;
    }): Promise<Edit>;
    /**
     * Extension point for the other job kinds (e.g. inversions or datasets, when the API has them): POST a JSON
     * body (or multipart `request` + `image`) to a job collection with the same idempotency and retry rules.
     */
    submitTo<T = Edit>(path: string, request: object, options?: SubmitOptions & {
        image?: ImageInput;
        filename?: string;
    }): Promise<T>;
    /** Prompt-to-Prompt: a source prompt and one or more target prompts (see `P2PEditRequest` for every field). */
    submitP2P(sourcePrompt: string, targetPrompts: string | string[], options?: P2POptions): Promise<Edit>;
    /** InstructPix2Pix: an image and an instruction, sent as multipart. */
    submitIP2P(image: ImageInput, instruction: string, options?: IP2POptions): Promise<Edit>;
    get(edit: string | Pick<Edit, "id">, options?: {
        signal?: AbortSignal;
    }): Promise<Edit>;
    /** One page of the caller's edits, newest first; pass `next_cursor` back as `cursor` for the next. */
    list(filters?: ListFilters): Promise<EditList>;
    /** Every matching edit, following cursors. */
    iterEdits(filters?: Omit<ListFilters, "cursor">): AsyncGenerator<Edit>;
    /** Queued: canceled at once. Processing: stops at its next denoising step (`cancel_requested` until then). */
    cancel(edit: string | Pick<Edit, "id">, options?: {
        signal?: AbortSignal;
    }): Promise<Edit>;
    models(options?: {
        signal?: AbortSignal;
    }): Promise<ModelInfo[]>;
    /**
     * Each state of the edit as the server publishes it (SSE), ending with the terminal one. Reconnects after
     * a dropped connection (every stream starts with the current state); older revisions are dropped.
     */
    stream(edit: string | Pick<Edit, "id">, options?: {
        signal?: AbortSignal;
    }): AsyncGenerator<Edit>;
    /**
     * Resolves with the edit once it succeeded; throws EditFailed / EditCanceled (with the server's error) or
     * WaitTimeout. `onProgress` sees every state: status, `queue_position`, `progress` (step / total).
     */
    wait(edit: string | Pick<Edit, "id">, options?: WaitOptions): Promise<Edit>;
    private streamOnce;
    /** The bytes behind a presigned result or attention-map URL (fetched without the API key). */
    download(url: string, options?: {
        signal?: AbortSignal;
    }): Promise<ArrayBuffer>;
    /** One API call, answered as parsed JSON (errors thrown as APIError). */
    json<T>(call: ApiCall): Promise<T>;
    private url;
    private send;
}
