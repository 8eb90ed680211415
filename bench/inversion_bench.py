"""Real-photo inversion benchmark: batching, caching, and the three methods' reconstruction errors.

(a) null-text inversion (reference defaults: 10 inner iterations, early stop) of 4 photos one at a time vs the
    same 4 as one ``InversionRunner`` batch (goal >= 2.5x throughput);
(b) a P2P re-edit from a cached inversion vs the first edit (inversion + edit) (goal <= 0.25x the time);
(c) reconstruction MSE on fp32 latents of ddim (guidance 1 and 7.5), negative-prompt and null-text (7.5).

Runs on ``tiny-sd-smooth`` (the well-conditioned random build; images are noise by design) with scikit-image's
public-domain photos. Times are wall-clock medians of ``--repeats`` runs after a warm-up. Results go to
bench/results/inversion-<machine>.txt and .json.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine", default=None, help="name for the results file (default: from the CPU model)")
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
             f"{a.steps} steps, median of {a.repeats} (torch {torch.__version__}, {platform.python_version()})"]
    figures: dict[str, float] = {}

    # (a) batching
    specs = [InversionSpec(f"p{i}", caption, image=image) for i, (image, caption) in enumerate(photos)]
    alone_s, _ = median_time(lambda: [inverter.run([s]) for s in specs], a.repeats)
    batch_s, _ = median_time(lambda: inverter.run(specs), a.repeats)
    figures.update(alone_per_image_s=alone_s / 4, batched_per_image_s=batch_s / 4, throughput_x=alone_s / batch_s)
    lines.append(f"(a) null-text inversion per image: alone {alone_s / 4:.2f} s, batched x4 {batch_s / 4:.2f} s "
                 f"-> {alone_s / batch_s:.2f}x throughput (goal >= 2.5x)")

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

    text = "\n".join(lines)
    print(text)
    machine = a.machine or cpu_model().lower().replace(" ", "-")
    out = REPO / "bench" / "results" / f"inversion-{machine}"
    out.with_suffix(".txt").write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
