// SSE framing over arbitrary chunk boundaries (the network splits where it likes), without a server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { readSSE } from "../dist/index.js";

function streamOf(chunks) {
  const encoder = new TextEncoder();
  return new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(encoder.encode(chunk));
      controller.close();
    },
  });
}

async function collect(chunks) {
  const out = [];
  for await (const message of readSSE(streamOf(chunks))) out.push(message);
  return out;
}

const WIRE = 'event: status\r\nid: 1\r\ndata: {"a":1}\r\n\r\n: keep-alive\n\nevent: progress\ndata: line1\ndata: line2\n\n'
  + "data: no-newline-at-end";

test("every split of the byte stream gives the same messages; an unfinished event is dropped", async () => {
  const expected = [{ event: "status", id: "1", data: '{"a":1}' }, { event: "progress", id: "1", data: "line1\nline2" },
];  // the unfinished last event is dropped
  assert.deepEqual(await collect([WIRE]), expected);
  for (let cut = 1; cut < WIRE.length; cut++) {
    assert.deepEqual(await collect([WIRE.slice(0, cut), WIRE.slice(cut)]), expected, `split at ${cut}`);
  }
  assert.deepEqual(await collect([...WIRE]), expected, "one character per chunk");
});

test("a multi-byte character split across chunks survives", async () => {
  const bytes = new TextEncoder().encode("data: caf\u00e9 \u{1F600}\n\n");
  const stream = new ReadableStream({
    start(controller) {
      for (const b of bytes) controller.enqueue(new Uint8Array([b]));
      controller.close();
    },
  });
  const out = [];
  for await (const message of readSSE(stream)) out.push(message.data);
  assert.deepEqual(out, ["caf\u00e9 \u{1F600}"]);
});
