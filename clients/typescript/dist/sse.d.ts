/**
 * Server-Sent Events over `fetch` + `ReadableStream`.
 *
 * Why not `EventSource`: it cannot send an `Authorization` header, and the API key must never travel in a
 * URL. This parser implements the framing of the HTML spec (fields `event`, `data`, `id`; comments; any of
 * CR, LF, CRLF as line ends; an unfinished event at the end is dropped) and works in browsers and Node 18+.
 */
export interface SSEMessage {
    event: string;
    data: string;
    id?: string;
}
/** Frames one event per blank line from a stream of text lines. */
export declare class SSEDecoder {
    private event;
    private data;
    private id;
    /** Feed one line (without its line end); returns a message when the line ends one. */
    feed(line: string): SSEMessage | null;
}
/** Every SSE message in a response body, in order; ends when the stream ends. */
export declare function readSSE(body: ReadableStream<Uint8Array>): AsyncGenerator<SSEMessage>;
