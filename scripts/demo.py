"""Run the whole service locally and edit images through the SDK (see scripts/demo.sh).

Three edits (a P2P word swap, a P2P reweight, an IP2P instruction), then a real photo: scikit-image's
public-domain astronaut (NASA) is inverted on the service (null-text, on ``tiny-sd-smooth``, the
well-conditioned tiny model), and P2P edits it by editing its caption; the reconstruction and the edit are saved.

The tiny models have random weights, so the pictures are noise: the demo shows the plumbing (queue,
batching, storage, signed webhooks, attention maps, inversions), not image quality.
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


def real_photo() -> tuple[bytes, str]:
    """A photo the project does not have to ship: scikit-image's public-domain astronaut (Eileen Collins, NASA)."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return buf.getvalue(), "a photo of an astronaut"


def edit_a_photo(client: Client, out: Path, steps: int, size: int) -> None:
    """Invert the photo on the service, save its reconstruction, then a P2P edit that starts from the inversion."""
    photo, caption = real_photo()
    (out / "photo").mkdir(parents=True, exist_ok=True)
    (out / "photo" / "astronaut.png").write_bytes(photo)
    inversion = client.invert(photo, caption, model="tiny-sd-smooth", method="null-text", steps=steps,
                              resolution=size, num_inner_steps=5)
    print(f"inversion {inversion.id}: {caption!r}, null-text, {steps} steps, {size} px (steps + inner iterations):")
    last = [None]

    def show(state) -> None:
        p = state.progress
        line = f"   {state.status.value}" + (f" {p.phase} step {p.step}/{p.total}" if p and p.total else "") + (
            f" inner {p.inner_iterations}/{p.inner_total}" if p and p.inner_total else "")
        if line != last[0]:
            print(line)
            last[0] = line

    done = client.wait_inversion(inversion, timeout=900, progress=show, poll_interval=0.2)
    paths = client.download_inversion(done, out / "photo")
    print(f"   reconstruction error (latent MSE) {done.reconstruction_error:.4g}; saved {paths[0]}")
    edit = client.submit_p2p(caption, ["a photo of a robot"], inversion=done, edit="replace",
                             cross_replace_steps=0.8, self_replace_steps=0.4)
    edited = client.wait(edit.id, timeout=600, progress=False)
    paths = client.download(edited, out / "photo")
    print(f"p2p-from-photo: {edited.status.value} (source = the reconstruction, target = the edit); saved:")
    for p in paths:
        print(f"   {p}")
    again = client.invert(photo, caption, model="tiny-sd-smooth", method="null-text", steps=steps, resolution=size,
                          num_inner_steps=5)
    print(f"   the same photo + caption again: inversion {again.id} reused={again.reused} (nothing recomputed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "demo-output")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--photo-steps", type=int, default=10, help="DDIM steps of the real-photo inversion")
    ap.add_argument("--photo-size", type=int, default=64, help="side of the inverted photo's square")
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
        stack.start_worker("demo-worker", models="tiny-sd,tiny-ip2p,tiny-sd-smooth")
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
        edit_a_photo(client, args.out, args.photo_steps, args.photo_size)
        deadline = time.time() + 30
        while time.time() < deadline and len(WebhookReceiver.received) < 2 * len(edits):
            time.sleep(0.2)
        ok = sum(1 for _, good in WebhookReceiver.received if good)
        print(f"webhooks received: {len(WebhookReceiver.received)}, signature verified: {ok}")
        print(f"done in {time.perf_counter() - t0:.1f}s -> {args.out}")
        print("note: the tiny models have random weights, so these images are noise by design "
              "(the photo's reconstruction and its edit too).")
    finally:
        stack.stop()
        hooks.shutdown()
        s3.stop()
        redis.stop()


if __name__ == "__main__":
    main()
