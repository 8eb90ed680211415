"""Run the whole service locally and edit three images through the SDK (see scripts/demo.sh).

The tiny models have random weights, so the pictures are noise: the demo shows the plumbing (queue,
batching, storage, signed webhooks, attention maps), not image quality.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from editserve import Client, verify_webhook  # noqa: E402
from service.config import Settings  # noqa: E402
from devtools.devstack import LocalStack, ensure_redis, free_port, start_seaweedfs  # noqa: E402


class WebhookReceiver(BaseHTTPRequestHandler):
    """Collects webhook POSTs and checks their Standard Webhooks signature."""

    secret: str = ""
    received: list[tuple[str, bool]] = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            event = verify_webhook(self.secret, dict(self.headers), body)
            self.received.append((event.type, True))
        except Exception:
            self.received.append(("?", False))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def sample_image() -> bytes:
    """A small synthetic photo stand-in (sky, ground, sun) so the demo needs no files."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (192, 128), (120, 170, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 84, 192, 128], fill=(70, 140, 60))
    draw.ellipse([140, 14, 176, 50], fill=(250, 220, 80))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "demo-output")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--redis-url", default=os.environ.get("EDITSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = ap.parse_args()

    models_dir = Path(os.environ.get("EDITSERVE_MODELS_DIR", REPO / ".models")).resolve()
    redis = ensure_redis(args.redis_url)
    s3 = start_seaweedfs(bucket="editserve", data_dir=REPO / ".run" / "s3")
    hook_port = free_port()
    stack = LocalStack(redis_url=args.redis_url, s3=s3, models_dir=models_dir,
                       extra_env={"EDITSERVE_WEBHOOKS__ALLOW_HOSTS": json.dumps(["127.0.0.1"])})
    WebhookReceiver.secret = Settings().webhooks.secret
    hooks = ThreadingHTTPServer(("127.0.0.1", hook_port), WebhookReceiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    t0 = time.perf_counter()
    try:
        stack.start_gateway()
        stack.start_worker("demo-worker")
        stack.start_webhook_sender()
        print(f"gateway {stack.base_url}  S3 {s3.endpoint_url}  logs {stack.log_dir}")
        client = Client(stack.base_url)
        webhook = {"url": f"http://127.0.0.1:{hook_port}/hook", "events": ["started", "completed"]}
        common = dict(steps=args.steps, seed=7, webhook=webhook)
        edits = {
            "p2p-word-swap": client.submit_p2p(
                source_prompt="a photo of a cat riding a bicycle", target_prompts=["a photo of a dog riding a bicycle"],
                edit="replace", cross_replace_steps=0.8, self_replace_steps=0.4, attention_maps=True,
                negative_prompt="blurry, low quality", scheduler="dpmpp_2m_karras", output_format="webp",
                **common),
            "p2p-reweight": client.submit_p2p(
                source_prompt="a photo of a fluffy cat", target_prompts=["a photo of a fluffy cat"],
                edit="reweight", reweight={"fluffy": 4.0}, attention_maps=[0, 1], **common),
            "ip2p": client.submit_ip2p(image=sample_image(), instruction="make it a snowy winter day",
                                        text_guidance=7.5, image_guidance=1.5, negative_prompt="blurry",
                                        scheduler="euler", output_format="webp", output_quality=85, **common),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for name, edit in edits.items():
            done = client.wait(edit.id, timeout=600)
            paths = client.download(done, args.out / name)
            print(f"{name}: {done.status.value} in batch of {done.metrics.batch_size}; saved:")
            for p in paths:
                print(f"   {p}")
        deadline = time.time() + 30
        while time.time() < deadline and len(WebhookReceiver.received) < 2 * len(edits):
            time.sleep(0.2)
        ok = sum(1 for _, good in WebhookReceiver.received if good)
        print(f"webhooks received: {len(WebhookReceiver.received)}, signature verified: {ok}")
        print(f"done in {time.perf_counter() - t0:.1f}s -> {args.out}")
        print("note: the tiny models have random weights, so these images are noise by design.")
    finally:
        stack.stop()
        hooks.shutdown()
        s3.stop()
        redis.stop()


if __name__ == "__main__":
    main()
