// The TypeScript client against a live stack: gateway, worker, Redis, S3 and the webhook sender, tiny models.
// Run by tests/test_typescript_client.py, which starts the stack and sets EDITSERVE_URL, EDITSERVE_API_KEY and
// EDITSERVE_WEBHOOK_SECRET (the tenant's). Random-weight models: the pictures are noise, their shapes are not.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { after, before, describe, test } from "node:test";

import { APIError, EditCanceled, EditserveClient, isTerminal, parseNpy, tokenMap } from "../dist/index.js";
import { verifyWebhook, WebhookVerificationError } from "../dist/webhooks.js";
import { encodePng, isPng, pngSize } from "./png.mjs";

const { EDITSERVE_URL, EDITSERVE_API_KEY, EDITSERVE_WEBHOOK_SECRET } = process.env;
if (!EDITSERVE_URL || !EDITSERVE_API_KEY || !EDITSERVE_WEBHOOK_SECRET) {
  throw new Error("needs a live stack: run `python3 -m pytest tests/test_typescript_client.py` (it sets "
                  + "EDITSERVE_URL, EDITSERVE_API_KEY and EDITSERVE_WEBHOOK_SECRET)");
}
const SIZE = 64;
const STEPS = 4;
const client = new EditserveClient({ timeoutMs: 30_000 });

describe("editserve TypeScript client, live", () => {
  const deliveries = [];
  let hooks;
  let hookUrl;

  before(async () => {
    hooks = createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        deliveries.push({ headers: req.headers, body: Buffer.concat(chunks) });
        res.writeHead(204).end();
      });
    });
    await new Promise((resolve) => hooks.listen(0, "127.0.0.1", resolve));
    hookUrl = `http://127.0.0.1:${hooks.address().port}/hook`;
  });
  after(() => hooks.close());

  test("models lists both tiny models, flagged as random weights", async () => {
    const models = await client.models();
    const byName = Object.fromEntries(models.map((m) => [m.name, m]));
    assert.deepEqual(byName["tiny-sd"].edit_kinds, ["p2p"]);
    assert.deepEqual(byName["tiny-ip2p"].edit_kinds, ["ip2p"]);
    assert.equal(byName["tiny-sd"].random_weights, true);
  });

  test("P2P: submit, wait with progress over SSE, results and attention maps download, signed webhooks", async () => {
    const submitted = await client.submitP2P("a photo of a cat", ["a photo of a dog"], {
      edit: "replace", steps: STEPS, height: SIZE, width: SIZE, seed: 7, attention_maps: true,
      reweight: { dog: 2 }, webhook: { url: hookUrl, events: ["started", "completed"] },
    });
    assert.equal(submitted.kind, "p2p");
    const seen = [];
    const done = await client.wait(submitted, { timeoutMs: 120_000, onProgress: (e) => seen.push(e) });
    assert.equal(done.status, "succeeded");
    assert.equal(seen.at(-1).status, "succeeded");
    const steps = seen.filter((e) => e.progress).map((e) => e.progress.step);
    assert.ok(steps.length > 0, "no progress event seen");
    assert.deepEqual(steps, [...steps].sort((a, b) => a - b), "progress went backwards");
    const revisions = seen.map((e) => e.revision);
    assert.deepEqual(revisions, [...revisions].sort((a, b) => a - b));
    assert.equal(done.params.seed, 7);

    assert.equal(done.results.length, 2); // the source and one target
    const png = await client.download(done.results[1].url);
    assert.ok(isPng(png));
    assert.deepEqual(pngSize(png), { width: SIZE, height: SIZE });

    assert.equal(done.attention_maps.length, 2);
    const target = done.attention_maps.find((m) => m.prompt_index === 1);
    const maps = parseNpy(await client.download(target.array_url));
    assert.equal(maps.shape.length, 3);
    assert.equal(maps.shape[0], target.tokens.length);
    const dog = tokenMap(maps, target.tokens.indexOf("dog"));
    assert.ok(dog.values.some((v) => v > 0), "the 'dog' map is empty");
    assert.ok(dog.values.every(Number.isFinite));
    assert.ok(isPng(await client.download(target.grid_url)));

    const again = await client.get(done.id);
    assert.equal(again.status, "succeeded");
    const page = await client.list({ kind: "p2p", limit: 50 });
    assert.ok(page.data.some((e) => e.id === done.id));

    // Webhooks: both events arrive signed with the tenant's secret; a changed byte is refused.
    const deadline = Date.now() + 90_000; // the sender may still be starting on a loaded machine
    const mine = () => deliveries.filter((d) => JSON.parse(d.body).data.id === done.id);
    while (mine().length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const events = mine().map((d) => verifyWebhook(EDITSERVE_WEBHOOK_SECRET, d.headers, d.body));
    assert.deepEqual(events.map((e) => e.type).sort(), ["edit.completed", "edit.started"]);
    const tampered = Buffer.from(mine()[0].body);
    tampered[tampered.length - 2] ^= 1;
    assert.throws(() => verifyWebhook(EDITSERVE_WEBHOOK_SECRET, mine()[0].headers, tampered), WebhookVerificationError);
    assert.throws(() => verifyWebhook("whsec_" + Buffer.alloc(32, 1).toString("base64"), mine()[0].headers,
                                      mine()[0].body), WebhookVerificationError);
  });

  test("IP2P: multipart upload, a sweep returns every cell with its scales", async () => {
    const photo = encodePng(80, 48, (x, y) => [x * 3, y * 5, 128]);
    const edit = await client.submitIP2P(new Blob([photo], { type: "image/png" }), "make it snowy", {
      steps: STEPS, resolution: SIZE, seed: 3, sweep: { image_guidance: [1.0, 1.5] }, filename: "in.png",
    });
    const done = await client.wait(edit.id, { timeoutMs: 120_000 });
    assert.equal(done.results.length, 2);
    assert.deepEqual(done.results.map((r) => r.image_guidance), [1.0, 1.5]);
    for (const result of done.results) {
      const png = await client.download(result.url);
      assert.ok(isPng(png));
      assert.equal(Math.max(...Object.values(pngSize(png))), SIZE);
    }
  });

  test("stream yields states in order and ends with the terminal one", async () => {
    const edit = await client.submitP2P("a red house", "a blue house", { steps: STEPS, height: SIZE, width: SIZE });
    const states = [];
    for await (const state of client.stream(edit)) states.push(state);
    assert.ok(isTerminal(states.at(-1)));
    assert.equal(states.filter(isTerminal).length, 1);
  });

  test("an invalid request is refused with the field it names, before anything is queued", async () => {
    await assert.rejects(
      client.submitP2P("a cat", "a dog", { steps: 0 }),
      (e) => e instanceof APIError && e.status === 422 && e.field === "steps");
    await assert.rejects(
      client.submitP2P("a cat", "a dog", { reweight: { dog: 50 } }),
      (e) => e instanceof APIError && e.status === 422 && e.field === "reweight");
    await assert.rejects(client.get("ed_does_not_exist"), (e) => e instanceof APIError && e.status === 404);
    const anonymous = new EditserveClient({ apiKey: "" });
    await assert.rejects(anonymous.models().then(() => anonymous.list()), (e) => e instanceof APIError && e.status === 401);
  });

  test("the same idempotency key returns the same edit", async () => {
    const options = { steps: STEPS, height: SIZE, width: SIZE, seed: 11, idempotencyKey: `ts-${Date.now()}` };
    const first = await client.submitP2P("a small boat", "a big boat", options);
    const second = await client.submitP2P("a small boat", "a big boat", options);
    assert.equal(second.id, first.id);
    await client.wait(first, { timeoutMs: 120_000 });
  });

  test("cancel: the edit ends canceled and wait() says so", async () => {
    const edit = await client.submitP2P("a tall tree", "a short tree", { steps: 200, height: SIZE, width: SIZE });
    const canceled = await client.cancel(edit);
    assert.ok(canceled.status === "canceled" || canceled.cancel_requested);
    await assert.rejects(client.wait(edit, { timeoutMs: 120_000 }), (e) => e instanceof EditCanceled
                         && e.edit.status === "canceled");
  });
});
