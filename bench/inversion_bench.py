"""Real-photo inversion benchmark: batching, caching, and the three methods' reconstruction errors.

(a) null-text inversion (reference defaults: 10 inner iterations, early stop) of 4 photos one at a time vs the
    same 4 as one ``InversionRunner`` batch (goal >= 2.5x throughput);
(b) a P2P re-edit from a cached inversion vs the first edit (inversion + edit) (goal <= 0.25x the time);
(c) reconstruction MSE on fp32 latents of ddim (guidance 1 and 7.5), negative-prompt and null-text (7.5);
(d) the ceiling of (a): the inner loop's bare UNet call (forward + backward to the embeddings), 4 rows in one
    call vs 4 calls of one row; batching cannot beat it unless Python overhead per call is large;
(e) with ``--service``: (a) through the whole service (gateway, Redis, S3, a worker process, the SDK): 4
    inversions submitted one after another (each waited for) vs 4 queued before the worker starts (one batch),
    timed from the records' started_at/completed_at (no model load or polling in it).

Runs on ``tiny-sd-smooth`` (the well-conditioned random build; images are noise by design) with scikit-image's
public-domain photos. Times are wall-clock medians of ``--repeats`` runs after a warm-up. Results go to
bench/results/inversion-<machine>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.machine import cpu_model  # noqa: E402

PHOTOS = [("astronaut", "a photo of an astronaut"), ("coffee", "a cup of coffee"),
          ("chelsea", "a photo of a cat"), ("rocket", "a rocket on a launch pad")]


def median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def unet_ceiling(model, size: int, repeats: int) -> tuple[float, float, float]:
    """(4 x one-row time / four-row time, one-row s, four-row s) of the null-text inner loop's UNet call: forward
    with the embedding requiring grad, backward to it (the embeddings differ per row, as in the batch)."""
    unet = model.unet
    width = model.encode_text(["x"]).shape[-1]
    latent = size // model.vae_scale_factor
    gen = torch.Generator().manual_seed(0)

    def call(rows: int) -> None:
        x = torch.randn(rows, 4, latent, latent, generator=gen)
        emb = torch.randn(rows, 77, width, generator=gen).requires_grad_(True)
        eps = unet(x, torch.full((rows,), 500, dtype=torch.long), encoder_hidden_states=emb, return_dict=False)[0]
        torch.autograd.grad(eps.square().sum(), [emb])

    def timed(rows: int) -> float:
        call(rows)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(rows)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    one, four = timed(1), timed(4)
    return 4 * one / four, one, four


def service_figures(figures: dict[str, float], photos, a) -> list[str]:
    """(e): 4 null-text inversions through gateway + worker process, one at a time vs queued together."""
    import io
    import tempfile

    from devtools.devstack import LocalStack, ensure_redis, free_port, start_seaweedfs
    from editserve import Client

    redis_server = ensure_redis(f"redis://127.0.0.1:{free_port()}/0", data_dir=Path(tempfile.mkdtemp()))
    s3 = start_seaweedfs(bucket="editserve-inv-bench")
    stack = LocalStack(redis_url=redis_server.url, s3=s3, models_dir=REPO / ".models",
                       extra_env={"EDITSERVE_WORKER__TORCH_THREADS": str(a.threads)})
    knobs = dict(model="tiny-sd-smooth", method="null-text", steps=a.steps, resolution=a.size)
    pngs = []
    for image, caption in photos:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        pngs.append((buf.getvalue(), caption))

    def span(items) -> float:
        return (max(i.completed_at for i in items) - min(i.started_at for i in items)).total_seconds()

    try:
        stack.start_gateway()
        with Client(stack.base_url, timeout=60) as client:
            queued = [client.invert(png, caption, **knobs) for png, caption in pngs]
            stack.start_worker("inv-bench", models="tiny-sd-smooth")
            together = [client.wait_inversion(i, timeout=1800, progress=False, poll_interval=0.2) for i in queued]
            alone = []
            for png, caption in pngs:  # another caption: not answered from the reuse cache
                one = client.invert(png, caption + ", alone", **knobs)
                alone.append(client.wait_inversion(one, timeout=1800, progress=False, poll_interval=0.2))
    finally:
        stack.stop()
        s3.stop()
        redis_server.stop()
    alone_s = sum(span([i]) for i in alone)
    batch_s = span(together)
    sizes = sorted({i.metrics.batch_size for i in together})
    figures.update(service_alone_per_image_s=alone_s / 4, service_batched_per_image_s=batch_s / 4,
                   service_throughput_x=alone_s / batch_s)
    return [f"(e) through the service (gateway + worker process + S3, {a.threads} torch thread(s)): alone "
            f"{alone_s / 4:.2f} s per image, 4 queued together {batch_s / 4:.2f} s (batch sizes {sizes}) "
            f"-> {alone_s / batch_s:.2f}x throughput",
            "    (timed from each record's started_at to completed_at: decode, S3 and progress writes included)"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default=None, help="name for the results file (default: from the CPU model)")
    p.add_argument("--service", action="store_true", help="also (e): the same through the whole service")
    p.add_argument("--only", default="abcde", help="sections to run, e.g. ad (default: all)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from skimage import data

    from service.config import Settings
    from worker.editing.batch import BatchRunner
    from worker.editing.inversion import InversionRunner, InversionSpec
    from worker.editing.jobs import P2PJobSpec
    from worker.models.builders import ensure_tiny_models

    models_dir = REPO / ".models"
    ensure_tiny_models(models_dir)
    from worker.models.registry import ModelRegistry

    model = ModelRegistry(Settings(models_dir=models_dir)).get("tiny-sd-smooth")
    photos = [(Image.fromarray(getattr(data, name)()), caption) for name, caption in PHOTOS]
    inverter = InversionRunner(model, height=a.size, width=a.size, steps=a.steps)
    p2p = BatchRunner(model, height=a.size, width=a.size, steps=a.steps, scheduler="ddim")
    lines = [f"inversion bench: {cpu_model()}, {a.threads} torch thread(s), tiny-sd-smooth {a.size}px, "
             f"{a.steps} steps, median of {a.repeats} (torch {torch.__version__}, {platform.python_version()}); "
             f"load average at start {os.getloadavg()[0]:.1f} (a shared machine: other jobs take CPU)"]
    figures: dict[str, float] = {}

    sections = set(a.only) - (set() if a.service else {"e"})

    # (a) batching
    specs = [InversionSpec(f"p{i}", caption, image=image) for i, (image, caption) in enumerate(photos)]
    if "a" in sections:
        alone_s, _ = median_time(lambda: [inverter.run([s]) for s in specs], a.repeats)
        batch_s, _ = median_time(lambda: inverter.run(specs), a.repeats)
        figures.update(alone_per_image_s=alone_s / 4, batched_per_image_s=batch_s / 4, throughput_x=alone_s / batch_s)
        lines.append(f"(a) null-text inversion per image: alone {alone_s / 4:.2f} s, batched x4 {batch_s / 4:.2f} s "
                     f"-> {alone_s / batch_s:.2f}x throughput (goal >= 2.5x)")
        print(lines[-1], flush=True)

    if "b" in sections:
        # (b) caching
        image, caption = photos[0]
        edit = dict(target_prompts=["a photo of an cosmonaut"], seed=0, edit="replace")

        def first_edit():
            inversion = inverter.run([InversionSpec("first", caption, image=image)])[0].inversion
            return p2p.run([P2PJobSpec("edit", caption, inversion=inversion, **edit)])[0]

        cached = inverter.run([InversionSpec("cached", caption, image=image)])[0].inversion
        first_s, _ = median_time(first_edit, a.repeats)
        again_s, _ = median_time(lambda: p2p.run([P2PJobSpec("again", caption, inversion=cached, **edit)]), a.repeats)
        figures.update(first_edit_s=first_s, cached_edit_s=again_s, cached_ratio=again_s / first_s)
        lines.append(f"(b) edit: first (invert + edit) {first_s:.2f} s, re-edit from the cached inversion "
                     f"{again_s:.2f} s -> {again_s / first_s:.3f}x (goal <= 0.25x)")

    if "c" in sections:
        # (c) reconstruction errors
        lines.append("(c) reconstruction MSE vs the photo latent (fp32), per photo:")
        for image, caption in photos:
            row = {}
            runs = [("ddim@1", "ddim", 1.0), ("ddim@7.5", "ddim", 7.5), ("negative-prompt@7.5", "negative-prompt", 7.5),
                    ("null-text@7.5", "null-text", 7.5)]
            for label, method, guidance in runs:
                result = inverter.run([InversionSpec(label, caption, image=image, method=method,
                                                     guidance_scale=guidance)])[0]
                row[label] = result.reconstruction_error
                variance = float(result.trajectory[0].var())
            figures.update({f"{caption}: {k}": v for k, v in row.items()})
            lines.append(f"    {caption!r:30} latent var {variance:.3g}: "
                         + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))

    if "d" in sections:
        ratio, one_s, four_s = unet_ceiling(model, a.size, repeats=max(5, a.repeats))
        figures.update(ceiling_x=ratio, ceiling_one_row_ms=one_s * 1e3, ceiling_four_rows_ms=four_s * 1e3)
        lines.append(f"(d) ceiling of (a): the inner loop's UNet forward+backward, 4 calls of 1 row {4 * one_s * 1e3:.0f} ms "
                     f"vs 1 call of 4 rows {four_s * 1e3:.0f} ms -> {ratio:.2f}x")
        print(lines[-1], flush=True)
    if "e" in sections:
        lines.extend(service_figures(figures, photos, a))
        print("\n".join(lines[-2:]), flush=True)
    lines.append(f"load average at the end {os.getloadavg()[0]:.1f}")
    text = "\n".join(lines)
    print(text)
    machine = a.machine or cpu_model().lower().replace(" ", "-")
    out = REPO / "bench" / "results" / f"inversion-{machine}"
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
