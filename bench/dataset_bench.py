"""Dataset benchmark: the IP2P data engine through the service vs the reference script's loop, and what
``metrics: true`` adds to an edit.

(a) throughput in samples/s (generated and scored, kept or rejected): a dataset job of ``--triplets`` ×
    ``--samples`` through a LocalStack gateway + 1 worker (its driver thread fans the job out into
    low-priority P2P edits, batched up to ``--batch``, CLIP-scored, filtered, written as WebDataset shards),
    timed from the POST to ``succeeded``; against a plain loop in this process shaped like the reference
    ``generate_img_dataset.py``: for each caption pair, for each sample, generate the pair alone with the same
    core (``BatchRunner`` with one job), score it with the same CLIP, apply the keep rule, save the kept
    pairs. Goal: service ≥ 3× the loop. Runs are interleaved (service, loop, service, loop) and medians taken.
(b) ``metrics: true``: a batch of ``--batch`` P2P jobs run by the core with and without the CLIP scoring
    pass the worker adds (interleaved, medians). Goal: ≤ 10 % extra per edit.

Tiny random-weight models (a tiny CLIP included): the timings are real, the images noise. Torch runs with
``--torch-threads`` intra-op threads in the worker and here alike.

    python bench/dataset_bench.py            # writes bench/results/dataset-<machine>.txt/.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service_bench import Bench, Deadline, machine_info, machine_slug  # noqa: E402
from signals import signals_interrupt  # noqa: E402

GOALS = {"a": 3.0, "b": 0.10}
CAPTIONS = [("a photo of a cat", "make it a dog", "a photo of a dog"),
            ("a red car on a road", "make it blue", "a blue car on a road"),
            ("a house in summer", "add snow", "a house in winter with snow"),
            ("a bowl of apples", "make them oranges", "a bowl of oranges"),
            ("a man with a hat", "remove the hat", "a man without a hat"),
            ("a river in a forest", "make it autumn", "a river in an autumn forest")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--triplets", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="samples per triplet")
    p.add_argument("--batch", type=int, default=16, help="worker max_batch_size; (b) jobs per batch")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="(a) interleaved service/loop pairs")
    p.add_argument("--metrics-repeats", type=int, default=3, help="(b) interleaved with/without pairs")
    p.add_argument("--metrics-size", type=int, default=128, help="(b) size (tiny-sd's default)")
    p.add_argument("--metrics-steps", type=int, default=20, help="(b) steps")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=1500.0)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--machine", default=None)
    return p.parse_args(argv)


def triplets(n: int) -> list[dict[str, str]]:
    return [dict(zip(("input", "instruction", "output"), CAPTIONS[i % len(CAPTIONS)])) for i in range(n)]


def job_body(args, seed: int, n_triplets: int | None = None, samples: int | None = None) -> dict[str, Any]:
    return {"triplets": triplets(n_triplets or args.triplets), "samples_per_triplet": samples or args.samples,
            "steps": args.steps, "height": args.size, "width": args.size, "seed": seed, "keep_best": 4}


# --- (a) the service ---------------------------------------------------------------------------------

def service_run(http, args, seed: int, deadline: Deadline, **shape) -> dict[str, Any]:
    t0 = time.perf_counter()
    created = http.post("/v1/datasets", json=job_body(args, seed, **shape))
    created.raise_for_status()
    dataset_id = created.json()["id"]
    while True:
        deadline.check("the dataset job finished")
        body = http.get(f"/v1/datasets/{dataset_id}").json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if body["status"] != "succeeded":
        raise RuntimeError(f"dataset job {body['status']}: {body.get('error')}")
    samples = body["counts"]["samples"] + body["counts"]["failed"]
    return {"seconds": round(seconds, 3), "samples": samples, "kept": body["counts"]["kept"],
            "samples_per_s": round(samples / seconds, 3)}


# --- (a) the reference loop ----------------------------------------------------------------------------

class Loop:
    """The reference script's shape with this repository's core: one caption pair's samples one at a time."""

    def __init__(self, args):
        import torch

        from service.config import Settings
        from worker.editing.batch import BatchRunner
        from worker.models.registry import ModelRegistry

        torch.set_num_threads(args.torch_threads)
        self.args = args
        registry = ModelRegistry(Settings(models_dir=REPO / ".models"))
        self.scorer = registry.clip_scorer()
        self.model = registry.get("tiny-sd")
        self.runner = BatchRunner(self.model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim")

    def run(self, seed: int, n_triplets: int | None = None, per_triplet: int | None = None,
            batch: int = 1) -> dict[str, Any]:
        """``batch`` 1: the reference's shape. ``batch`` > 1: the same samples through the core in batches (no
        service around it): the ceiling the service's batching can reach on this machine."""
        from service.datasets import sample_payload, triplet_plan
        from worker.runtime.execute import p2p_spec
        from worker.scoring.attach import attach_scores
        from worker.scoring.selection import CODE_THRESHOLDS, PairScores, keep_and_rank
        from editserve.contract import CaptionTriplet

        args = self.args
        params = {"model": "tiny-sd", "steps": args.steps, "scheduler": "ddim", "height": args.size,
                  "width": args.size, "self_replace_layers": "medium"}
        out = Path(tempfile.mkdtemp(prefix="editserve-loop-"))
        t0 = time.perf_counter()
        samples = kept = 0
        work = []
        for index, raw in enumerate(triplets(n_triplets or args.triplets)):
            triplet = CaptionTriplet(**raw)
            for plan in triplet_plan(seed, index, per_triplet or args.samples, (0.1, 0.9), (7.5, 15.0)):
                payload = sample_payload("loop", "bench", params, index, triplet, plan, f"loop-{index}-{plan.sample}")
                work.append((index, plan, p2p_spec(payload, payload.request)))
        scored: dict[int, list] = {}
        for start in range(0, len(work), batch):
            chunk = work[start:start + batch]
            results = self.runner.run([spec for _, _, spec in chunk])
            attach_scores(self.scorer, [(spec, result) for (_, _, spec), result in zip(chunk, results)])
            for (index, plan, _), result in zip(chunk, results):
                samples += 1
                if result.ok and result.scores and result.scores[1]:
                    scored.setdefault(index, []).append(((plan, result), PairScores(**result.scores[1])))
        for index, pairs in scored.items():
            for plan, result in keep_and_rank(pairs, CODE_THRESHOLDS, 4):
                result.images[0].save(out / f"{index}_{plan.seed}_0.png")
                result.images[1].save(out / f"{index}_{plan.seed}_1.png")
                kept += 1
        seconds = time.perf_counter() - t0
        return {"seconds": round(seconds, 3), "samples": samples, "kept": kept,
                "samples_per_s": round(samples / seconds, 3)}


# --- (b) metrics overhead ------------------------------------------------------------------------------

def metrics_overhead(loop: Loop, args) -> dict[str, Any]:
    from worker.editing.batch import BatchRunner
    from worker.editing.jobs import P2PJobSpec
    from worker.scoring.attach import attach_scores

    runner = BatchRunner(loop.model, height=args.metrics_size, width=args.metrics_size, steps=args.metrics_steps,
                         scheduler="ddim")

    def specs(score: bool) -> list[P2PJobSpec]:
        return [P2PJobSpec(job_id=f"m{i}", source_prompt="a photo of a cat riding a bicycle",
                           target_prompts=["a photo of a dog riding a bicycle"], seed=100 + i, edit="replace",
                           score=score) for i in range(args.batch)]

    def once(score: bool) -> float:
        jobs = specs(score)
        t0 = time.perf_counter()
        results = runner.run(jobs)
        if score:
            attach_scores(loop.scorer, list(zip(jobs, results)))
            assert all(r.scores and r.scores[1] for r in results)
        return time.perf_counter() - t0

    once(True)  # warm
    plain, scored = [], []
    for _ in range(args.metrics_repeats):
        plain.append(once(False))
        scored.append(once(True))
    p, s = statistics.median(plain), statistics.median(scored)
    return {"batch": args.batch, "size": args.metrics_size, "steps": args.metrics_steps, "plain_s": round(p, 4), "with_metrics_s": round(s, 4),
            "extra_per_edit_ms": round((s - p) / args.batch * 1000, 2), "extra_fraction": round(s / p - 1, 4),
            "plain_runs": [round(x, 4) for x in plain], "metrics_runs": [round(x, 4) for x in scored]}


def render(info: dict[str, Any], a: dict[str, Any], b: dict[str, Any], args) -> str:
    ratio = a["ratio"]
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.torch_threads} torch thread(s), "
        f"load average at start {info.get('loadavg_at_start')}",
        f"tiny random-weight models (tiny-sd, tiny CLIP), {args.size} px, {args.steps} steps",
        "",
        f"(a) dataset job, {args.triplets} triplets x {args.samples} samples, worker batch {args.batch}:",
        f"    service runs (samples/s): {[r['samples_per_s'] for r in a['service']]}",
        f"    reference-shaped loop   : {[r['samples_per_s'] for r in a['loop']]}",
        f"    bare core in batches of {args.batch}: {[r['samples_per_s'] for r in a['bare']]}",
        f"    median service {a['service_median']} / loop {a['loop_median']} samples/s = {ratio:.2f}x "
        f"(goal >= {GOALS['a']}x: {'met' if ratio >= GOALS['a'] else 'missed'})",
        f"    ceiling: the bare batched core / loop = {a['ceiling']:.2f}x; service / bare batched core = "
        f"{a['service_median'] / a['bare_median']:.2f}x",
        "",
        f"(b) metrics: true, batch of {b['batch']} P2P jobs at {b['size']} px, {b['steps']} steps: {b['plain_s']} s without, {b['with_metrics_s']} s with "
        f"= +{b['extra_per_edit_ms']} ms per edit, +{b['extra_fraction'] * 100:.1f} % "
        f"(goal <= {GOALS['b'] * 100:.0f} %: {'met' if b['extra_fraction'] <= GOALS['b'] else 'missed'})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import httpx

    args = parse_args(argv)
    deadline = Deadline(args.max_seconds)
    from worker.models.builders import ensure_tiny_models

    ensure_tiny_models(REPO / ".models")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {info.get('loadavg_at_start')}", flush=True)
    bench = Bench(args)
    a: dict[str, Any] = {"service": [], "loop": [], "bare": []}
    with signals_interrupt():
        try:
            bench.start_backing()
            window = max(args.samples, 2 * args.batch)
            stack = bench.make_stack({
                "EDITSERVE_WORKER__MAX_BATCH_SIZE": str(args.batch), "EDITSERVE_WORKER__TORCH_THREADS":
                    str(args.torch_threads), "EDITSERVE_WORKER__METRICS_PORT": "0",
                "EDITSERVE_DATASETS__WINDOW_SAMPLES": str(window), "EDITSERVE_DATASETS__DRIVER_INTERVAL_SECONDS": "0.1",
                "EDITSERVE_LIMITS__TENANT_RPS": "0", "EDITSERVE_LIMITS__TENANT_MAX_CONCURRENT": str(4 * window)})
            stack.start_gateway()
            stack.start_worker("bench-worker", models="tiny-sd")
            with httpx.Client(base_url=stack.base_url, timeout=30) as http:
                print("warm-up (model and CLIP loading) ...", flush=True)
                service_run(http, args, 999, deadline, n_triplets=1, samples=2)
                loop = Loop(args)
                loop.run(998, n_triplets=1, per_triplet=2)
                for r in range(args.repeats):
                    a["service"].append(service_run(http, args, 10 + r, deadline))
                    print(f"service run {r + 1}: {a['service'][-1]}", flush=True)
                    deadline.check("the loop run")
                    a["loop"].append(loop.run(10 + r))
                    print(f"loop run {r + 1}: {a['loop'][-1]}", flush=True)
                    deadline.check("the bare batched run")
                    a["bare"].append(loop.run(10 + r, batch=args.batch))
                    print(f"bare batched run {r + 1}: {a['bare'][-1]}", flush=True)
            stack.stop()
            b = metrics_overhead(loop, args)
            print(f"metrics: {b}", flush=True)
        finally:
            bench.close()
    a["service_median"] = round(statistics.median(r["samples_per_s"] for r in a["service"]), 3)
    a["loop_median"] = round(statistics.median(r["samples_per_s"] for r in a["loop"]), 3)
    a["ratio"] = round(a["service_median"] / a["loop_median"], 3)
    a["bare_median"] = round(statistics.median(r["samples_per_s"] for r in a["bare"]), 3)
    a["ceiling"] = round(a["bare_median"] / a["loop_median"], 3)
    table = render(info, a, b, args)
    print("\n" + table)
    slug = args.machine or machine_slug(info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dataset-{slug}.txt").write_text(table + "\n")
    report = {"machine": info, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "throughput": a, "metrics": b}
    (args.out / f"dataset-{slug}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {args.out / f'dataset-{slug}.txt'} and .json")
    return report


if __name__ == "__main__":
    main()
