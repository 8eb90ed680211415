"""Core editing benchmark: what batching and our sampler cost or save against plain diffusers.

(a) a P2P pair (source + 1 target, replace) vs diffusers' StableDiffusionPipeline making the same 2 images
    (goal ≤ 1.10×: attention control must be cheap);
(b) 8 compatible P2P jobs as one BatchRunner batch vs the same 8 run one at a time (goal ≥ 3× throughput);
(c) one IP2P edit through BatchRunner vs StableDiffusionInstructPix2PixPipeline, same settings (goal ≤ 1.02×).
Optional ``--sweep 1,2,4,8,16``: P2P throughput (jobs/s) and peak GPU memory per batch size, the figure to size a
worker's ``max_batch_size`` with.

Every figure is the median of ``--repeats`` timed runs after a warm-up, end to end (text encoding, sampling,
VAE decode to PIL). Defaults run the tiny random models on CPU; on a GPU build SD-1.5-shaped models with
``python -m worker.models.builders --out DIR --shape sd15-shaped --kind text2image|instruct --dtype float16``
and pass ``--p2p-model DIR --ip2p-model DIR --size 512 --steps 50 --device cuda --dtype float16``.
Results go to bench/results/core-<machine>.txt and .json, rewritten after every benchmark (a run cut short still
leaves what it measured). On CUDA every figure also records peak GPU memory. ``--max-seconds`` is a soft budget:
a benchmark or sweep point that would not finish in it is skipped (and reported so). A failing benchmark is
reported with its error and the others still run (exit status 1). bench/gpu_run.sh is the one-shot GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np
import torch
from PIL import Image

GOALS = {"a": ("<=", 1.10), "b": (">=", 3.0), "c": ("<=", 1.02)}

P2P_PAIRS = [
    ("a cat riding a bicycle", "a dog riding a bicycle"),
    ("a house by the lake", "a castle by the lake"),
    ("a red car in the snow", "a blue car in the snow"),
    ("a bowl of apples", "a bowl of oranges"),
    ("a painting of a forest", "a painting of a desert"),
    ("a man with a hat", "a woman with a hat"),
    ("a boat on the river", "a swan on the river"),
    ("a cup of coffee", "a cup of tea"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p2p-model", type=Path, default=REPO / ".models" / "tiny-sd", help="text2image model folder")
    p.add_argument("--ip2p-model", type=Path, default=REPO / ".models" / "tiny-ip2p", help="instruct model folder")
    p.add_argument("--size", type=int, default=128, help="height = width in pixels")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-jobs", type=int, default=8, help="jobs in benchmark (b)")
    p.add_argument("--only", default="abc", help="subset of benchmarks to run, e.g. 'ac'")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--machine", default=None, help="name in the result files (default: from the CPU/GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sweep", default="", help="P2P batch sizes to sweep after the benchmarks, e.g. 1,2,4,8,16")
    p.add_argument("--sweep-repeats", type=int, default=1, help="timed runs per sweep point (after a short warm-up)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="soft time budget: skip what would not finish in it (default: none)")
    return p.parse_args(argv)


# --- machine -------------------------------------------------------------------------------------

from machine import cpu_model  # noqa: E402  (bench/ is the script's folder)


def machine_info(device: str) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    import diffusers

    info["diffusers"] = diffusers.__version__
    if on_cuda(device):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, sdp_flash=torch.backends.cuda.flash_sdp_enabled())
    return info


def load_average() -> list[float] | None:
    """Other processes on a shared box distort CPU timings; the report records how busy it was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_slug(info: dict[str, Any]) -> str:
    name = info.get("gpu") or f"{info['cpu']}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# --- models and timing ---------------------------------------------------------------------------

def load_model(folder: Path, kind: str, device: str, dtype: str, scheduler: str):
    from service.config import ModelSpec
    from worker.models.registry import LoadedModel, load_pipeline

    spec = ModelSpec(name=folder.name, kind=kind, source=str(folder), dtype=dtype, device=device, scheduler=scheduler)
    return LoadedModel(spec=spec, pipe=load_pipeline(spec))


def ensure_models(args: argparse.Namespace) -> None:
    defaults = {REPO / ".models" / "tiny-sd", REPO / ".models" / "tiny-ip2p"}
    if {args.p2p_model, args.ip2p_model} <= defaults and not all((p / "model_index.json").exists() for p in defaults):
        from worker.models.builders import ensure_tiny_models

        ensure_tiny_models(REPO / ".models")


def on_cuda(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def sync(device: str) -> None:
    if on_cuda(device):
        torch.cuda.synchronize()


MIB = 2**20


def reset_peak(device: str) -> None:
    if on_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    """torch's peak allocated GPU memory since the last ``reset_peak`` (None off CUDA)."""
    return torch.cuda.max_memory_allocated() / MIB if on_cuda(device) else None


def allocated_mib(device: str) -> float | None:
    return torch.cuda.memory_allocated() / MIB if on_cuda(device) else None


def model_mib(model) -> float:
    """Weights of the model's UNet, VAE and text encoder: what a worker holds before any job runs."""
    modules = (model.unet, model.vae, model.text_encoder)
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())) / MIB


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def paired_medians(ours: Callable[[], Any], baseline: Callable[[], Any], repeats: int,
                   device: str, peaks: dict[str, Any] | None = None) -> tuple[float, float, list[float], list[float]]:
    """Medians of interleaved runs (ours, baseline, ours, ...) after one warm-up each, so that drift in
    machine load (a shared CI box) hits both sides alike. On CUDA, ``peaks`` (if given) receives each side's
    peak allocated memory over its timed runs and what was allocated before them (model weights etc.), in MiB."""
    ours(), baseline()  # warm-up: allocator, kernels, lazy imports, fonts
    ours_runs, base_runs = [], []
    resident = allocated_mib(device)
    ours_peak = base_peak = 0.0
    for _ in range(repeats):
        reset_peak(device)
        ours_runs.append(timed(ours, device))
        ours_peak = max(ours_peak, peak_mib(device) or 0.0)
        reset_peak(device)
        base_runs.append(timed(baseline, device))
        base_peak = max(base_peak, peak_mib(device) or 0.0)
    if peaks is not None and resident is not None:
        peaks.update(resident_mib=resident, ours_peak_mib=ours_peak, baseline_peak_mib=base_peak)
    return statistics.median(ours_runs), statistics.median(base_runs), ours_runs, base_runs


def diffusers_twin(model, cls_name: str, scheduler: str):
    """diffusers' own pipeline on the same weights and a fresh scheduler of the same configuration."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(**{**model.pipe.components, "scheduler": model.new_scheduler(scheduler)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_ok(results) -> None:
    bad = [r for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"benchmark job failed: {bad[0].job_id}: {bad[0].error!r}")


# --- the three benchmarks --------------------------------------------------------------------------

def bench_p2p_pair(model, args) -> dict[str, Any]:
    from worker.editing.batch import BatchRunner
    from worker.editing.jobs import P2PJobSpec

    source, target = P2P_PAIRS[0]
    runner = BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim")
    job = P2PJobSpec("pair", source, [target], seed=0, edit="replace", cross_replace_steps=0.8,
                     self_replace_steps=0.4, guidance_scale=7.5)
    pipe = diffusers_twin(model, "StableDiffusionPipeline", "ddim")
    gen_kwargs = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "guidance_scale": 7.5}
    peaks: dict[str, Any] = {}
    ours, base, ours_runs, base_runs = paired_medians(
        lambda: check_ok(runner.run([job])),
        lambda: pipe([source, target], generator=torch.Generator().manual_seed(0), **gen_kwargs),
        args.repeats, args.device, peaks)
    return {"name": "a", "what": "P2P pair (replace) vs diffusers 2-image generation", "ours_s": ours,
            "baseline_s": base, "ratio": ours / base, "ours_runs": ours_runs, "baseline_runs": base_runs, **peaks}


def p2p_jobs(count: int) -> list:
    """``count`` compatible P2P jobs that differ in prompts, seeds, schedules and guidance."""
    from worker.editing.jobs import P2PJobSpec

    jobs = []
    for i in range(count):
        source, target = P2P_PAIRS[i % len(P2P_PAIRS)]
        jobs.append(P2PJobSpec(f"job{i}", source, [target], seed=i, edit="replace",
                               cross_replace_steps=0.6 + 0.05 * (i % 4), self_replace_steps=0.2 + 0.05 * (i % 3),
                               guidance_scale=6.0 + 0.5 * (i % 8)))
    return jobs


def bench_p2p_batch(model, args) -> dict[str, Any]:
    from worker.editing.batch import BatchRunner

    runner = BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim")
    jobs = p2p_jobs(args.batch_jobs)

    def one_at_a_time():
        for job in jobs:
            check_ok(runner.run([job]))

    peaks: dict[str, Any] = {}
    batched, serial, batched_runs, serial_runs = paired_medians(
        lambda: check_ok(runner.run(jobs)), one_at_a_time, args.repeats, args.device, peaks)
    return {"name": "b", "what": f"{len(jobs)} P2P jobs: one at a time / one batch (speed-up)",
            "unet_ceiling": unet_batching_ceiling(model, args, rows_per_job=2 * len(jobs[0].prompts), jobs=len(jobs)),
            "ours_s": batched, "baseline_s": serial, "ratio": serial / batched, "ours_runs": batched_runs,
            "baseline_runs": serial_runs, "images_per_s_batched": 2 * len(jobs) / batched,
            "images_per_s_serial": 2 * len(jobs) / serial, **peaks}


@torch.no_grad()
def unet_batching_ceiling(model, args, rows_per_job: int, jobs: int) -> dict[str, float]:
    """The most batching can give here: one bare UNet call of all rows vs one call per job (plain SDPA, no
    controllers). When this is far below the goal, the hardware is compute-bound, not overhead-bound."""
    h = w = args.size // model.vae_scale_factor
    dim = model.text_encoder.config.hidden_size

    def call(rows: int):
        sample = torch.randn(rows, 4, h, w, device=model.device, dtype=model.dtype)
        text = torch.randn(rows, 77, dim, device=model.device, dtype=model.dtype)
        return lambda: model.unet(sample, torch.full((rows,), 500, device=model.device), encoder_hidden_states=text)

    one_job, all_jobs = call(rows_per_job), call(rows_per_job * jobs)
    per_job, batched, _, _ = paired_medians(one_job, all_jobs, args.repeats, args.device)
    return {"unet_s_per_job_call": per_job, "unet_s_batched_call": batched, "speedup": jobs * per_job / batched}


def bench_ip2p(model, args) -> dict[str, Any]:
    from worker.editing.batch import BatchRunner
    from worker.editing.jobs import IP2PCell, IP2PJobSpec

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
    runner = BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="euler_a")
    job = IP2PJobSpec("edit", image, "make it look like a watercolor", [IP2PCell(7.5, 1.5, 0)])
    pipe = diffusers_twin(model, "StableDiffusionInstructPix2PixPipeline", "euler_a")
    peaks: dict[str, Any] = {}
    ours, base, ours_runs, base_runs = paired_medians(
        lambda: check_ok(runner.run([job])),
        lambda: pipe(job.instruction, image=image, num_inference_steps=args.steps, guidance_scale=7.5,
                     image_guidance_scale=1.5, generator=torch.Generator().manual_seed(0)),
        args.repeats, args.device, peaks)
    return {"name": "c", "what": "IP2P edit vs diffusers InstructPix2Pix pipeline", "ours_s": ours,
            "baseline_s": base, "ratio": ours / base, "ours_runs": ours_runs, "baseline_runs": base_runs, **peaks}


def sweep_point(model, args, jobs_per_batch: int) -> dict[str, Any]:
    """One ``BatchRunner`` batch of ``jobs_per_batch`` P2P jobs: seconds, jobs/s and peak memory.

    The warm-up runs the same batch for 2 steps only (same shapes: kernels, allocator), to save time."""
    from worker.editing.batch import BatchRunner

    jobs = p2p_jobs(jobs_per_batch)
    kw = {"height": args.size, "width": args.size, "scheduler": "ddim"}
    check_ok(BatchRunner(model, steps=min(2, args.steps), **kw).run(jobs))
    runner = BatchRunner(model, steps=args.steps, **kw)
    resident = allocated_mib(args.device)
    runs, peak = [], 0.0
    for _ in range(max(1, args.sweep_repeats)):
        reset_peak(args.device)
        runs.append(timed(lambda: check_ok(runner.run(jobs)), args.device))
        peak = max(peak, peak_mib(args.device) or 0.0)
    seconds = statistics.median(runs)
    row = {"jobs": jobs_per_batch, "unet_rows": 2 * 2 * jobs_per_batch, "s": seconds, "runs": runs,
           "jobs_per_s": jobs_per_batch / seconds, "images_per_s": 2 * jobs_per_batch / seconds}
    if resident is not None:  # reserved: what torch's caching allocator held at most (its fragmentation included)
        row.update(resident_mib=resident, peak_mib=peak, working_mib=peak - resident,
                   peak_reserved_mib=torch.cuda.max_memory_reserved() / MIB)
    return row


# --- report ----------------------------------------------------------------------------------------

WHAT = {"a": "P2P pair (replace) vs diffusers 2-image generation",
        "b": "P2P jobs: one at a time / one batch (speed-up)",
        "c": "IP2P edit vs diffusers InstructPix2Pix pipeline"}


def verdict(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED: {row['error']}"
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    op, goal = GOALS[row["name"]]
    met = row["ratio"] <= goal if op == "<=" else row["ratio"] >= goal
    return f"{'met' if met else 'MISSED'} (goal {op} {goal:.2f}x)"


def render(rows: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
           sweep: list[dict[str, Any]] | None = None) -> str:
    gpu = f", {info['gpu_memory_gib']} GiB, CUDA {info['cuda']}" if info.get("gpu") else ""
    lines = [
        (f"editserve core benchmark — {info.get('gpu') or info['cpu']}{gpu} ({info['cores']} cores, "
         f"torch {info['torch']} [{info['torch_threads']} threads], diffusers {info['diffusers']})"),
        (f"models: {args.p2p_model.name} / {args.ip2p_model.name}; {args.size}x{args.size} px, {args.steps} steps, "
         f"{args.device} {args.dtype}; median of {args.repeats} interleaved runs after warm-up; "
         f"load average {info.get('loadavg_start')} -> {info.get('loadavg_end')}"),
        "",
        f"{'':2}{'benchmark':<52}{'ours s':>9}{'base s':>9}{'ratio':>8}{'best':>8}  verdict (median ratio)",
    ]
    for r in rows:
        if "ratio" not in r:
            lines.append(f"{r['name']:<2}{r.get('what', WHAT[r['name']]):<52}{'':>34}  {verdict(r)}")
            continue
        lines.append(f"{r['name']:<2}{r['what']:<52}{r['ours_s']:>9.3f}{r['baseline_s']:>9.3f}{r['ratio']:>7.2f}x"
                     f"{r['ratio_best']:>7.2f}x  {verdict(r)}")
    for r in rows:
        if "unet_ceiling" in r:
            c = r["unet_ceiling"]
            lines.append(f"\n({r['name']}) ceiling: one bare UNet call per job {c['unet_s_per_job_call'] * 1e3:.1f} ms vs all "
                         f"rows in one call {c['unet_s_batched_call'] * 1e3:.1f} ms -> at most {c['speedup']:.2f}x "
                         "from batching on this device")
    peaks = [r for r in rows if "ours_peak_mib" in r]
    if peaks:
        lines.append("\npeak GPU memory (torch max_memory_allocated over the timed runs; resident = allocated before "
                     f"them; weights of the loaded models, MiB: {info.get('models_mib')}):")
        for r in peaks:
            lines.append(f"({r['name']}) ours {r['ours_peak_mib']:,.0f} MiB, baseline "
                         f"{r['baseline_peak_mib']:,.0f} MiB, resident {r['resident_mib']:,.0f} MiB")
    if sweep:
        lines += ["", (f"P2P batch-size sweep: jobs of 1 source + 1 target (4 UNet rows each), {args.size} px, "
                       f"{args.steps} steps, median of {args.sweep_repeats} run(s) after a 2-step warm-up"),
                  f"{'jobs/batch':>11}{'UNet rows':>11}{'s/batch':>9}{'jobs/s':>8}{'img/s':>8}"
                  f"{'peak MiB':>10}{'working MiB':>13}{'reserved MiB':>14}"]
        for pt in sweep:
            if "s" not in pt:
                lines.append(f"{pt['jobs']:>11}  {verdict(pt)}")
                continue
            mem = (f"{pt['peak_mib']:>10,.0f}{pt['working_mib']:>13,.0f}{pt['peak_reserved_mib']:>14,.0f}"
                   if "peak_mib" in pt else f"{'-':>10}{'-':>13}{'-':>14}")
            lines.append(f"{pt['jobs']:>11}{pt['unet_rows']:>11}{pt['s']:>9.2f}{pt['jobs_per_s']:>8.2f}"
                         f"{pt['images_per_s']:>8.2f}{mem}")
        if any("working_mib" in pt for pt in sweep):
            lines.append("peak = torch max_memory_allocated; working = peak − resident (all loaded weights); reserved ="
                         " max_memory_reserved. A worker needs about its one model's weights + working memory.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds if args.max_seconds else None
    sweep_sizes = [int(x) for x in args.sweep.split(",") if x.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_models(args)
    info = machine_info(args.device)
    info["loadavg_start"] = load_average()
    slug = args.machine or machine_slug(info)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    per_job_s: list[float] = []  # seconds of one P2P pair alone, once (a) has measured it: predicts the rest

    def log(msg: str) -> None:
        print(f"[core_bench {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    def save(final: bool = False) -> dict[str, Any]:
        info["loadavg_end"] = load_average()
        info["elapsed_s"] = time.perf_counter() - t_start
        table = render(rows, info, args, sweep)
        report = {"machine": info, "complete": final,
                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "results": [{**r, "verdict": verdict(r)} for r in rows], "sweep": sweep}
        (args.out / f"core-{slug}.txt").write_text(table + "\n")
        (args.out / f"core-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
        return report

    def model(kind: str):
        """Each model is loaded once, on first use; a load failure fails every benchmark that needs it."""
        if kind not in models:
            folder, scheduler = (args.p2p_model, "ddim") if kind == "text2image" else (args.ip2p_model, "euler_a")
            t0 = time.perf_counter()
            try:
                models[kind] = load_model(folder, kind, args.device, args.dtype, scheduler)
            except Exception as exc:  # noqa: BLE001
                models[kind] = exc
            else:
                info.setdefault("models_mib", {})[kind] = round(model_mib(models[kind]))
                log(f"loaded {folder} ({kind}) in {time.perf_counter() - t0:.1f}s")
        if isinstance(models[kind], Exception):
            raise models[kind]
        return models[kind]

    def attempt(label: str, predicted_s: float, fn: Callable[[], dict[str, Any]],
                placeholder: dict[str, Any]) -> dict[str, Any]:
        if deadline is not None and time.perf_counter() + predicted_s > deadline:
            left = deadline - time.perf_counter()
            log(f"{label}: skipped, predicted {predicted_s:.0f}s but {left:.0f}s of --max-seconds left")
            return {**placeholder, "skipped": f"over --max-seconds (predicted {predicted_s:.0f}s, {left:.0f}s left)"}
        log(f"{label}: start" + (f" (predicted ~{predicted_s:.0f}s)" if predicted_s else ""))
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 — one broken benchmark must not cost the others
            traceback.print_exc()
            result = {**placeholder, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["wall_s"] = time.perf_counter() - t0
        log(f"{label}: done in {result['wall_s']:.1f}s" + (f" — {result['error']}" if "error" in result else ""))
        return result

    def finish_row(row: dict[str, Any]) -> None:
        if "ratio" in row:  # best-of ratio: less sensitive to other processes than the median on a shared box
            best_ours, best_base = min(row["ours_runs"]), min(row["baseline_runs"])
            row["ratio_best"] = best_base / best_ours if row["name"] == "b" else best_ours / best_base
        rows.append(row)
        save()

    runs = args.repeats + 1  # timed runs + warm-up
    if "a" in args.only:
        row = attempt("(a) P2P pair", 0, lambda: bench_p2p_pair(model("text2image"), args),
                      {"name": "a", "what": WHAT["a"]})
        if "ours_s" in row:
            per_job_s.append(row["ours_s"])
        finish_row(row)
    pair = per_job_s[0] if per_job_s else 0.0
    if "b" in args.only:
        finish_row(attempt(f"(b) {args.batch_jobs} P2P jobs", runs * 1.5 * args.batch_jobs * pair,
                           lambda: bench_p2p_batch(model("text2image"), args),
                           {"name": "b", "what": f"{args.batch_jobs} {WHAT['b']}"}))
    if "c" in args.only:
        finish_row(attempt("(c) IP2P edit", runs * 2 * pair, lambda: bench_ip2p(model("instruct"), args),
                           {"name": "c", "what": WHAT["c"]}))
    for n in sweep_sizes:
        known = [pt for pt in sweep if "s" in pt]  # per-job time falls with batch size: the last point bounds it
        per_job = known[-1]["s"] / known[-1]["jobs"] if known else pair
        predicted = n * per_job * (max(1, args.sweep_repeats) + 2 / args.steps) + (2 if known else 0)
        sweep.append(attempt(f"sweep {n} jobs/batch", predicted, lambda: sweep_point(model("text2image"), args, n),
                             {"jobs": n}))
        save()
    report = save(final=True)
    print(render(rows, info, args, sweep))
    print(f"\nwritten: {args.out / f'core-{slug}.txt'} and .json ({time.perf_counter() - t_start:.0f}s)")
    return report


def failed(report: dict[str, Any]) -> bool:
    return any("error" in r for r in [*report["results"], *report["sweep"]])


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
