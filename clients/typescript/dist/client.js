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
import { APIConnectionError, APIError, EditCanceled, EditFailed, WaitTimeout, errorFromResponse } from "./errors.js";
import { readSSE } from "./sse.js";
import { isTerminal, } from "./types.js";
export const API_VERSION = "v1";
const DEFAULT_BASE_URL = "http://127.0.0.1:8000";
const RETRY_STATUSES = new Set([429, 502, 503, 504]);
const NO_EVENTS_STATUSES = new Set([404, 405, 406, 501]);
const MAX_RETRY_WAIT_MS = 60_000;
const env = (name) => globalThis.process?.env?.[name] || undefined;
const sleep = (ms, signal) => new Promise((resolve, reject) => {
    if (signal?.aborted)
        return reject(signal.reason);
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(signal.reason);
    }, { once: true });
});
/** AbortSignal.any where it exists (Node 20.3+, current browsers), else the same by hand (Node 18). */
function anySignal(signals) {
    if (signals.length === 1)
        return signals[0];
    const native = AbortSignal.any;
    if (native)
        return native(signals);
    const controller = new AbortController();
    for (const signal of signals) {
        if (signal.aborted) {
            controller.abort(signal.reason);
            break;
        }
        signal.addEventListener("abort", () => controller.abort(signal.reason), { once: true });
    }
    return controller.signal;
}
function randomKey() {
    const c = globalThis.crypto;
    if (c?.randomUUID)
        return c.randomUUID();
    return Array.from({ length: 4 }, () => Math.random().toString(36).slice(2, 10)).join("-");
}
function backoffMs(attempt) {
    return Math.min(500 * 2 ** attempt, 8000) * (0.75 + Math.random() * 0.5);
}
function editId(edit) {
    return typeof edit === "string" ? edit : edit.id;
}
/** Drops undefined values: the server resolves every default itself and echoes them in `params`. */
function defined(values) {
    return Object.fromEntries(Object.entries(values).filter(([, v]) => v !== undefined));
}
function splitSubmitOptions(options) {
    const { idempotencyKey, wait, signal, ...fields } = options;
    return [fields, { idempotencyKey, wait, signal }];
}
function asBlob(image) {
    if (image instanceof Blob)
        return image;
    if (image instanceof ArrayBuffer)
        return new Blob([image]);
    const view = image;
    return new Blob([new Uint8Array(view.buffer, view.byteOffset, view.byteLength)]);
}
function endedOrReturn(edit) {
    if (edit.status === "failed")
        throw new EditFailed(edit);
    if (edit.status === "canceled")
        throw new EditCanceled(edit);
    return edit;
}
export class EditserveClient {
    baseUrl;
    timeoutMs;
    retries;
    apiKey;
    headers;
    fetchImpl;
    constructor(options = {}) {
        const origin = globalThis.location?.origin;
        this.baseUrl = (options.baseUrl ?? env("EDITSERVE_URL") ?? (origin && origin !== "null" ? origin : DEFAULT_BASE_URL))
            .replace(/\/+$/, "");
        this.apiKey = options.apiKey ?? env("EDITSERVE_API_KEY");
        this.timeoutMs = options.timeoutMs ?? 30_000;
        this.retries = Math.max(0, options.retries ?? 2);
        this.headers = { accept: "application/json", ...options.headers };
        this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
    }
    // -- submitting --------------------------------------------------------------------------------------
    /** Any edit request; an `image` goes as a multipart file (IP2P). Returns the edit as the server answered. */
    async submit(request, options = {}) {
        return this.submitTo(`/${API_VERSION}/edits`, request, options);
    }
    /**
     * Extension point for the other job kinds (e.g. inversions or datasets, when the API has them): POST a JSON
     * body (or multipart `request` + `image`) to a job collection with the same idempotency and retry rules.
     */
    async submitTo(path, request, options = {}) {
        const headers = { "idempotency-key": options.idempotencyKey ?? `ts-${randomKey()}` };
        if (options.wait !== undefined)
            headers.prefer = `wait=${Math.max(0, Math.floor(options.wait))}`;
        const body = defined(request);
        if (options.image === undefined) {
            return this.json({ method: "POST", path, json: body, headers, signal: options.signal });
        }
        if (body.image) {
            throw new APIError("send the image either inline or as a file, not both", 0, "invalid_request", "image", null);
        }
        const form = new FormData();
        form.set("request", JSON.stringify(body));
        form.set("image", asBlob(options.image), options.filename ?? options.image.name ?? "image");
        return this.json({ method: "POST", path, form, headers, signal: options.signal });
    }
    /** Prompt-to-Prompt: a source prompt and one or more target prompts (see `P2PEditRequest` for every field). */
    submitP2P(sourcePrompt, targetPrompts, options = {}) {
        const [fields, submit] = splitSubmitOptions(options);
        const targets = typeof targetPrompts === "string" ? [targetPrompts] : targetPrompts;
        return this.submit({ ...fields, kind: "p2p", source_prompt: sourcePrompt, target_prompts: targets }, submit);
    }
    /** InstructPix2Pix: an image and an instruction, sent as multipart. */
    submitIP2P(image, instruction, options = {}) {
        const { filename, ...rest } = options;
        const [fields, submit] = splitSubmitOptions(rest);
        return this.submit({ ...fields, kind: "ip2p", instruction }, { ...submit, image, filename });
    }
    // -- reading -----------------------------------------------------------------------------------------
    get(edit, options = {}) {
        return this.json({ method: "GET", path: `/${API_VERSION}/edits/${encodeURIComponent(editId(edit))}`, ...options });
    }
    /** One page of the caller's edits, newest first; pass `next_cursor` back as `cursor` for the next. */
    list(filters = {}) {
        const { signal, ...query } = filters;
        return this.json({ method: "GET", path: `/${API_VERSION}/edits`, query, signal });
    }
    /** Every matching edit, following cursors. */
    async *iterEdits(filters = {}) {
        let cursor;
        do {
            const page = await this.list({ ...filters, cursor });
            yield* page.data;
            cursor = page.next_cursor ?? undefined;
        } while (cursor);
    }
    /** Queued: canceled at once. Processing: stops at its next denoising step (`cancel_requested` until then). */
    cancel(edit, options = {}) {
        return this.json({ method: "POST", path: `/${API_VERSION}/edits/${encodeURIComponent(editId(edit))}/cancel`, ...options });
    }
    async models(options = {}) {
        const page = await this.json({ method: "GET", path: `/${API_VERSION}/models`, ...options });
        return page.data;
    }
    // -- following ---------------------------------------------------------------------------------------
    /**
     * Each state of the edit as the server publishes it (SSE), ending with the terminal one. Reconnects after
     * a dropped connection (every stream starts with the current state); older revisions are dropped.
     */
    async *stream(edit, options = {}) {
        const id = editId(edit);
        let lastRevision = -1;
        let failures = 0;
        for (;;) {
            try {
                for await (const state of this.streamOnce(id, options.signal)) {
                    failures = 0;
                    if ((state.revision ?? 0) < lastRevision)
                        continue;
                    lastRevision = state.revision ?? 0;
                    yield state;
                    if (isTerminal(state))
                        return;
                }
            }
            catch (error) {
                if (!(error instanceof APIConnectionError) || options.signal?.aborted)
                    throw error;
                if (++failures > this.retries)
                    throw error;
                await sleep(backoffMs(failures - 1), options.signal);
            }
        }
    }
    /**
     * Resolves with the edit once it succeeded; throws EditFailed / EditCanceled (with the server's error) or
     * WaitTimeout. `onProgress` sees every state: status, `queue_position`, `progress` (step / total).
     */
    async wait(edit, options = {}) {
        const id = editId(edit);
        const deadline = options.timeoutMs === undefined ? null : Date.now() + options.timeoutMs;
        const timer = new AbortController();
        const signal = anySignal([timer.signal, ...(options.signal ? [options.signal] : [])]);
        const timeout = deadline === null ? undefined : setTimeout(() => timer.abort(new WaitTimeout("", null)), Math.max(0, deadline - Date.now()));
        let last = typeof edit === "string" ? null : edit;
        let useEvents = true;
        const expired = () => new WaitTimeout(`edit ${id} not finished after ${options.timeoutMs} ms`, last);
        try {
            for (;;) {
                if (useEvents) {
                    try {
                        for await (const state of this.streamOnce(id, signal)) {
                            last = state;
                            options.onProgress?.(state);
                            if (isTerminal(state))
                                return endedOrReturn(state);
                        }
                    }
                    catch (error) {
                        if (timer.signal.aborted)
                            throw expired();
                        if (error instanceof APIError && NO_EVENTS_STATUSES.has(error.status))
                            useEvents = false;
                        else if (!(error instanceof APIConnectionError))
                            throw error;
                    }
                }
                // The stream ended without a terminal state, broke, or is unavailable: poll once, then go on.
                try {
                    last = await this.get(id, { signal });
                    options.onProgress?.(last);
                    if (isTerminal(last))
                        return endedOrReturn(last);
                    await sleep(useEvents ? backoffMs(0) : options.pollIntervalMs ?? 1000, signal);
                }
                catch (error) {
                    if (timer.signal.aborted)
                        throw expired();
                    throw error;
                }
            }
        }
        finally {
            clearTimeout(timeout);
        }
    }
    async *streamOnce(id, signal) {
        const response = await this.send({
            method: "GET", path: `/${API_VERSION}/edits/${encodeURIComponent(id)}/events`,
            headers: { accept: "text/event-stream" }, signal, timeout: false,
        });
        if (!response.body)
            throw new APIConnectionError("the events response has no body");
        try {
            for await (const message of readSSE(response.body)) {
                if (message.data)
                    yield JSON.parse(message.data);
            }
        }
        catch (error) {
            if (error instanceof SyntaxError || signal?.aborted)
                throw error;
            throw new APIConnectionError(`event stream broke: ${String(error)}`);
        }
    }
    // -- results -----------------------------------------------------------------------------------------
    /** The bytes behind a presigned result or attention-map URL (fetched without the API key). */
    async download(url, options = {}) {
        let response;
        try {
            response = await this.fetchImpl(url, { signal: options.signal });
        }
        catch (error) {
            throw new APIConnectionError(`download failed: ${String(error)}`);
        }
        if (!response.ok)
            throw await errorFromResponse(response);
        return response.arrayBuffer();
    }
    // -- transport ---------------------------------------------------------------------------------------
    /** One API call, answered as parsed JSON (errors thrown as APIError). */
    async json(call) {
        const response = await this.send(call);
        return (await response.json());
    }
    url(call) {
        const query = new URLSearchParams();
        for (const [k, v] of Object.entries(call.query ?? {}))
            if (v !== undefined && v !== null)
                query.set(k, String(v));
        const qs = query.toString();
        return `${this.baseUrl}${call.path}${qs ? `?${qs}` : ""}`;
    }
    async send(call) {
        const headers = { ...this.headers, ...call.headers };
        if (this.apiKey)
            headers.authorization = `Bearer ${this.apiKey}`;
        let body;
        if (call.json !== undefined) {
            headers["content-type"] = "application/json";
            body = JSON.stringify(call.json);
        }
        else if (call.form) {
            body = call.form; // fetch sets the multipart boundary
        }
        for (let attempt = 0;; attempt++) {
            const signals = call.signal ? [call.signal] : [];
            if (call.timeout !== false)
                signals.push(AbortSignal.timeout(this.timeoutMs));
            const signal = signals.length ? anySignal(signals) : undefined;
            let response = null;
            try {
                response = await this.fetchImpl(this.url(call), { method: call.method, headers, body, signal });
            }
            catch (error) {
                if (call.signal?.aborted)
                    throw call.signal.reason ?? error;
                if (attempt >= this.retries)
                    throw new APIConnectionError(`${call.method} ${call.path}: ${String(error)}`);
            }
            if (response) {
                if (response.ok)
                    return response;
                if (!RETRY_STATUSES.has(response.status) || attempt >= this.retries)
                    throw await errorFromResponse(response);
                await response.body?.cancel().catch(() => undefined);
            }
            const retryAfter = response ? Number(response.headers.get("retry-after")) : NaN;
            await sleep(Number.isFinite(retryAfter) && retryAfter >= 0
                ? Math.min(retryAfter * 1000, MAX_RETRY_WAIT_MS) : backoffMs(attempt), call.signal);
        }
    }
}
