"""Is the denoising step bound by the GPU or by Python? One bounded run of the figures issue 17 asks for.

(w) warm-up: compiling/capturing every row bucket used below with an empty inductor cache, and (r) again in a
    fresh process once the on-disk cache is filled (a restarted worker);
(g) per-step GPU-busy share at batch 1 (torch.profiler: kernel time / wall time), plain generation and a P2P
    word swap, eager and accelerated (goal ≥ 85 %);
(p) a P2P pair vs diffusers' 2-image generation (goal ≤ 1.05×);
(d) our plain generation vs diffusers, eager and with ``torch.compile`` (goal: faster than both);
(t) a 16-job P2P batch vs the bare compiled UNet at the same rows in a tight loop (goal ≥ 0.85×);
and peak GPU memory of every side. "Accelerated" = ``worker.editing.acceleration`` as a GPU worker runs it:
tensor-indexed P2P controllers, row buckets, ``torch.compile`` (``reduce-overhead``: CUDA graphs).

    python bench/step_bench.py --tiny                    # CPU, tiny model: every stage end to end, in minutes
    python bench/step_bench.py --model DIR --device cuda --dtype float16 --size 512 --steps 50   # gpu_run.sh

Figures are medians of ``--repeats`` runs after a warm-up, end to end (text encoding, sampling, VAE decode).
Results: bench/results/step-<machine>.txt and .json (or ``--out``), rewritten after every stage, so a run cut
short keeps what it measured; a stage that would not fit ``--max-seconds`` is skipped and reported so. On the
CPU the busy share and peak memory are not measurable (reported as such).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from core_bench import (  # noqa: E402
    P2P_PAIRS,
    check_ok,
    diffusers_twin,
    load_model,
    machine_info,
    machine_slug,
    on_cuda,
    p2p_jobs,
    peak_mib,
    reset_peak,
    timed,
)

GOALS = {"g": (">=", 0.85), "p": ("<=", 1.05), "d": ("<=", 1.0), "t": (">=", 0.85)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / ".models" / "tiny-sd", help="text2image model folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jobs", type=int, default=16, help="P2P jobs in the throughput batch (t)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="auto (default): on CUDA only; --tiny compiles on the CPU too, so every path runs")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="mode without CUDA graphs")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; --tiny: aot_eager, "
                   "the same graphs and guards without inductor's minutes of C++ code generation on a CPU)")
    p.add_argument("--only", default="wgpdtr", help="stages to run, in order, e.g. 'gp'")
    p.add_argument("--max-seconds", type=float, default=1e9, help="soft budget: later stages are skipped")
    p.add_argument("--machine", default=None, help="name in the result files (default: from the CPU/GPU)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tiny", action="store_true", help="CPU, fp32, tiny model, 64 px, 3 steps, 4 jobs, 1 repeat")
    p.add_argument("--warm-up-only", action="store_true", help=argparse.SUPPRESS)  # the cold-cache child
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.dtype, args.size, args.steps, args.repeats = "cpu", "float32", 64, 3, 1
        args.jobs = min(args.jobs, 4)
        args.compile = args.compile or "on"
        args.compile_mode = "default"  # no autotuning on a CPU
        args.backend = args.backend or "aot_eager"
    args.compile = args.compile or "auto"
    args.backend = args.backend or "inductor"
    return args


def acceleration_for(args, cache_dir: str | None):
    from worker.editing.acceleration import StepAcceleration
    from worker.editing.buckets import parse_buckets

    buckets = parse_buckets([2, 4, 4 * args.jobs])  # a plain pair, a P2P pair, the throughput batch
    return StepAcceleration(compile=args.compile, compile_mode=args.compile_mode, cuda_graphs=args.cuda_graphs,
                            row_buckets=buckets, cache_dir=cache_dir, backend=args.backend)


def runner_for(model, args, acceleration=None):
    from worker.editing.batch import BatchRunner

    return BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim",
                       acceleration=acceleration)


def pair_jobs():
    from worker.editing.jobs import P2PJobSpec

    source, target = P2P_PAIRS[0]
    edit = P2PJobSpec("pair", source, [target], seed=0, edit="replace", cross_replace_steps=0.8,
                      self_replace_steps=0.4, guidance_scale=7.5)
    plain = P2PJobSpec("plain", source, [target], seed=0, edit="none", guidance_scale=7.5)
    return edit, plain


def median_run(fn, args) -> tuple[float, list[float], float | None]:
    """(median seconds, runs, peak MiB over the runs) after one warm-up call."""
    fn()
    runs, peak = [], 0.0
    for _ in range(args.repeats):
        reset_peak(args.device)
        runs.append(timed(fn, args.device))
        peak = max(peak, peak_mib(args.device) or 0.0)
    return statistics.median(runs), runs, (peak if on_cuda(args.device) else None)


def busy_share(fn, args) -> dict[str, Any]:
    """One profiled run: GPU kernel time / wall time, kernels per step (CPU: no device timeline)."""
    from torch.profiler import ProfilerActivity, profile

    if not on_cuda(args.device):
        wall = timed(fn, args.device)
        return {"wall_s": wall, "busy_share": None, "kernels_per_step": None}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = timed(fn, args.device)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "device_time", 0.0) or getattr(e, "cuda_time", 0.0) for e in kernels)
    return {"wall_s": wall, "busy_share": busy_us / 1e6 / wall, "kernels_per_step": len(kernels) / args.steps}


# --- stages -------------------------------------------------------------------------------------------------

def stage_warm_up(model, args, acceleration) -> dict[str, Any]:
    """Cold: this process, an empty inductor cache (the stages after it reuse what it compiled)."""
    from worker.editing.acceleration import warm_up

    if not acceleration.compiles_on(model.device):
        return {"name": "w", "what": "warm-up", "skipped": "compilation is off on this device"}
    cold = warm_up(model, acceleration, height=args.size, width=args.size)
    return {"name": "w", "what": "warm-up over the buckets, empty cache (compile + capture)",
            "buckets": list(acceleration.row_buckets), "cold_s": cold.total_seconds, "per_bucket_s": cold.seconds}


def stage_restart(model, args, acceleration) -> dict[str, Any]:
    """A restarted worker: a fresh process warming up from the on-disk cache the stages above filled."""
    if not acceleration.compiles_on(model.device):
        return {"name": "r", "what": "warm-up after a restart", "skipped": "compilation is off on this device"}
    cmd = [sys.executable, __file__, "--warm-up-only", "--cache-dir", acceleration.cache_dir, "--model",
           str(args.model), "--device", args.device, "--dtype", args.dtype, "--size", str(args.size),
           "--jobs", str(args.jobs), "--compile", args.compile, "--compile-mode", args.compile_mode,
           "--backend", args.backend]
    if not args.cuda_graphs:
        cmd.append("--no-cuda-graphs")
    t0 = time.perf_counter()
    child = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, min(args.max_seconds, 3600.0)))
    process_s = time.perf_counter() - t0
    if child.returncode:
        raise RuntimeError(f"warm-up after a restart failed: {child.stderr[-2000:]}")
    restart = json.loads(child.stdout.strip().splitlines()[-1])
    return {"name": "r", "what": "warm-up after a restart (fresh process, on-disk cache filled)",
            "restart_s": restart["total_s"], "per_bucket_s": restart["seconds"],
            "process_s_incl_model_load": process_s}


def stage_busy(model, args, acceleration) -> dict[str, Any]:
    edit, plain = pair_jobs()
    out: dict[str, Any] = {"name": "g", "what": "GPU-busy share per step at batch 1 (1 job = 2 images)"}
    for label, accel in (("eager", None), ("accelerated", acceleration)):
        runner = runner_for(model, args, accel)
        for kind, job in (("plain", plain), ("p2p", edit)):
            fn = lambda job=job, runner=runner: check_ok(runner.run([job]))  # noqa: E731
            median, runs, peak = median_run(fn, args)
            out[f"{label}_{kind}"] = {"s_per_step": median / args.steps, "runs_s": runs, "peak_mib": peak,
                                      **busy_share(fn, args)}
    shares = [v["busy_share"] for k, v in out.items() if k.startswith("accelerated") and v["busy_share"] is not None]
    out["value"] = min(shares) if shares else None
    return out


def stage_pair(model, args, acceleration) -> dict[str, Any]:
    edit, _ = pair_jobs()
    runner = runner_for(model, args, acceleration)
    pipe = diffusers_twin(model, "StableDiffusionPipeline", "ddim")
    kw = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "guidance_scale": 7.5}
    ours, ours_runs, ours_peak = median_run(lambda: check_ok(runner.run([edit])), args)
    base, base_runs, base_peak = median_run(
        lambda: pipe(list(edit.prompts), generator=torch.Generator().manual_seed(0), **kw), args)
    return {"name": "p", "what": "P2P pair (accelerated) / diffusers 2-image generation (eager)", "ours_s": ours,
            "baseline_s": base, "value": ours / base, "ours_runs": ours_runs, "baseline_runs": base_runs,
            "ours_peak_mib": ours_peak, "baseline_peak_mib": base_peak}


def stage_diffusers(model, args, acceleration) -> dict[str, Any]:
    _, plain = pair_jobs()
    runner = runner_for(model, args, acceleration)
    pipe = diffusers_twin(model, "StableDiffusionPipeline", "ddim")
    kw = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "guidance_scale": 7.5}
    prompts = list(plain.prompts)
    ours, ours_runs, ours_peak = median_run(lambda: check_ok(runner.run([plain])), args)
    eager, eager_runs, eager_peak = median_run(
        lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), **kw), args)
    mode = acceleration.mode_on(model.device)
    compiled_pipe = diffusers_twin(model, "StableDiffusionPipeline", "ddim")
    options = {"mode": mode} if args.backend == "inductor" else {}
    compiled_pipe.unet = torch.compile(model.unet, backend=args.backend, **options)
    t0 = time.perf_counter()
    compiled_pipe(prompts, generator=torch.Generator().manual_seed(0), **kw)  # compile outside the timing
    compile_s = time.perf_counter() - t0
    comp, comp_runs, comp_peak = median_run(
        lambda: compiled_pipe(prompts, generator=torch.Generator().manual_seed(0), **kw), args)
    return {"name": "d", "what": f"our plain generation / diffusers (eager; torch.compile {args.backend} {mode})",
            "ours_s": ours, "diffusers_eager_s": eager, "diffusers_compiled_s": comp,
            "value": ours / min(eager, comp), "vs_eager": ours / eager, "vs_compiled": ours / comp,
            "diffusers_compile_s": compile_s, "ours_runs": ours_runs, "eager_runs": eager_runs,
            "compiled_runs": comp_runs, "ours_peak_mib": ours_peak, "eager_peak_mib": eager_peak,
            "compiled_peak_mib": comp_peak}


@torch.no_grad()
def stage_throughput(model, args, acceleration) -> dict[str, Any]:
    from worker.editing.acceleration import accelerated_unet

    jobs = p2p_jobs(args.jobs)
    runner = runner_for(model, args, acceleration)
    ours, ours_runs, ours_peak = median_run(lambda: check_ok(runner.run(jobs)), args)
    rows = sum(2 * len(j.prompts) for j in jobs)
    unet = accelerated_unet(model, acceleration)
    unet = model.unet if unet is None else unet
    f = model.vae_scale_factor
    sample = torch.randn(rows, model.unet.config.in_channels, args.size // f, args.size // f,
                         device=model.device, dtype=model.dtype)
    text = torch.randn(rows, 77, model.unet.config.cross_attention_dim, device=model.device, dtype=model.dtype)
    timesteps = torch.full((rows,), 500, device=model.device)

    def bare_loop():
        for _ in range(args.steps):
            unet(sample, timesteps, encoder_hidden_states=text, return_dict=False)

    bare, bare_runs, bare_peak = median_run(bare_loop, args)
    return {"name": "t", "what": f"{len(jobs)}-job P2P batch ({rows} rows) / bare UNet loop at the same rows",
            "jobs_per_s": len(jobs) / ours, "bare_jobs_per_s": len(jobs) / bare, "value": bare / ours,
            "ours_s": ours, "bare_s": bare, "ours_runs": ours_runs, "bare_runs": bare_runs,
            "ours_peak_mib": ours_peak, "bare_peak_mib": bare_peak,
            "bare_unet": "compiled" if unet is not model.unet else "eager"}


STAGES = {"w": stage_warm_up, "r": stage_restart, "g": stage_busy, "p": stage_pair, "d": stage_diffusers, "t": stage_throughput}


# --- report --------------------------------------------------------------------------------------------------

def verdict(row: dict[str, Any], device: str = "cuda") -> str:
    goal = GOALS.get(row["name"])
    value = row.get("value")
    if goal is None or value is None:
        return "not measurable here" if goal and "error" not in row and "skipped" not in row else ""
    op, target = goal
    met = value >= target if op == ">=" else value <= target
    if not on_cuda(device):  # the goals are about a GPU; a CPU run only shows that every stage works
        return f"{value:.3f} (CPU run: the goal {op} {target} is for a GPU, not judged here)"
    return f"{value:.3f} (goal {op} {target}: {'met' if met else 'NOT met'})"


def render(rows: list[dict[str, Any]], info: dict[str, Any], args) -> str:
    lines = [f"step_bench on {info.get('gpu') or info['cpu']} ({args.device}, {args.dtype}, {args.size} px, "
             f"{args.steps} steps, {args.repeats} repeats, compile={args.compile} ({args.backend}), "
             f"cuda_graphs={args.cuda_graphs})",
             f"torch {info['torch']}, diffusers {info['diffusers']}", ""]
    for row in rows:
        lines.append(f"({row['name']}) {row['what']}: "
                     + (row.get("error") or row.get("skipped") or verdict(row, args.device)))
        for key, value in row.items():
            if key in ("name", "what", "value", "error", "skipped") or key.endswith("_runs"):
                continue
            lines.append(f"    {key}: {json.dumps(value, default=str)}")
    return "\n".join(lines) + "\n"


def warm_up_child(args) -> int:
    """A warm-up in its own process (nothing cached in memory, only on disk); prints one JSON line."""
    from worker.editing.acceleration import use_compile_cache, warm_up

    use_compile_cache(args.cache_dir)
    model = load_model(args.model, "text2image", args.device, args.dtype, "ddim")
    acceleration = acceleration_for(args, args.cache_dir)
    result = warm_up(model, acceleration, height=args.size, width=args.size)
    print(json.dumps({"total_s": result.total_seconds, "seconds": result.seconds}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warm_up_only:
        return warm_up_child(args)
    started = time.perf_counter()
    info = machine_info(args.device)
    slug = args.machine or machine_slug(info)
    model = load_model(args.model, "text2image", args.device, args.dtype, "ddim")
    cache = tempfile.mkdtemp(prefix="editserve-inductor-main-")
    acceleration = acceleration_for(args, cache)
    rows: list[dict[str, Any]] = []
    failed = False
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.only:
        spent = time.perf_counter() - started
        if spent > args.max_seconds:
            rows.append({"name": key, "what": STAGES[key].__doc__ or key, "skipped": f"budget spent ({spent:.0f} s)"})
            continue
        t0 = time.perf_counter()
        try:
            row = STAGES[key](model, args, acceleration)
        except Exception as exc:  # noqa: BLE001 — report it, run the other stages
            failed = True
            row = {"name": key, "what": key, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        row["stage_s"] = time.perf_counter() - t0
        rows.append(row)
        print(render([row], info, args).split("\n", 3)[-1], flush=True)
        report = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / f"step-{slug}.json").write_text(json.dumps(report, indent=1, default=str))
        (args.out / f"step-{slug}.txt").write_text(render(rows, info, args))
    print(render(rows, info, args))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
