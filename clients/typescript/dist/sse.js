/**
 * Server-Sent Events over `fetch` + `ReadableStream`.
 *
 * Why not `EventSource`: it cannot send an `Authorization` header, and the API key must never travel in a
 * URL. This parser implements the framing of the HTML spec (fields `event`, `data`, `id`; comments; any of
 * CR, LF, CRLF as line ends; an unfinished event at the end is dropped) and works in browsers and Node 18+.
 */
/** Frames one event per blank line from a stream of text lines. */
export class SSEDecoder {
    event = "message";
    data = [];
    id;
    /** Feed one line (without its line end); returns a message when the line ends one. */
    feed(line) {
        if (line === "") {
            if (this.data.length === 0) {
                this.event = "message";
                return null;
            }
            const message = { event: this.event, data: this.data.join("\n") };
            if (this.id !== undefined)
                message.id = this.id;
            this.event = "message";
            this.data = [];
            return message;
        }
        if (line.startsWith(":"))
            return null; // a comment: the server's keep-alive
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" "))
            value = value.slice(1);
        if (name === "event")
            this.event = value;
        else if (name === "data")
            this.data.push(value);
        else if (name === "id")
            this.id = value;
        return null;
    }
}
/** Every SSE message in a response body, in order; ends when the stream ends. */
export async function* readSSE(body) {
    const reader = body.getReader();
    const text = new TextDecoder();
    const decoder = new SSEDecoder();
    let buffer = "";
    try {
        for (;;) {
            const { value, done } = await reader.read();
            buffer += done ? text.decode() : text.decode(value, { stream: true });
            // Split on CRLF, CR or LF; a CR at the very end may be half of a CRLF: keep it for the next chunk.
            let start = 0;
            for (let i = 0; i < buffer.length; i++) {
                const ch = buffer[i];
                if (ch !== "\n" && ch !== "\r")
                    continue;
                if (ch === "\r" && i === buffer.length - 1 && !done)
                    break;
                const message = decoder.feed(buffer.slice(start, i));
                if (ch === "\r" && buffer[i + 1] === "\n")
                    i++;
                start = i + 1;
                if (message)
                    yield message;
            }
            buffer = buffer.slice(start);
            if (done)
                return; // an event not ended by a blank line is incomplete: the spec drops it
        }
    }
    finally {
        reader.releaseLock();
        await body.cancel().catch(() => undefined);
    }
}
