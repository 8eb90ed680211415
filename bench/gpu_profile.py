"""Where a P2P pair's step time goes on a GPU: wall time vs the GPU's busy time, ours vs plain diffusers.

Why: on an H200 a P2P word swap took 1.2-1.3x diffusers' time at batch 4 (core_bench (a)), where the CPU showed
1.05x. If the GPU is idle for much of each step, the step is bound by Python's kernel launches and the
remedy is fewer launches (fusion, CUDA graphs), not faster kernels. This prints, per side: seconds per
UNet step, the GPU's busy share of it (sum of kernel times / wall time, from torch.profiler), kernel launches
per step, and our explicit-attention path's share of the launches.

    python bench/gpu_profile.py --model DIR --device cuda --dtype float16     # (gpu_run.sh: GPU_RUN_PROFILE=1)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from core_bench import P2P_PAIRS, check_ok, diffusers_twin, load_model, timed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / ".models" / "tiny-sd")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="folder for gpu-profile.json")
    return p.parse_args(argv)


def profile_once(fn, device: str) -> dict:
    """One run under torch.profiler: device-busy seconds, kernel launches, top CPU-side operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        wall = timed(fn, device)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(getattr(e, "device_time", 0.0) or getattr(e, "cuda_time", 0.0) for e in kernels)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"wall_s": wall, "device_busy_s": busy_us / 1e6, "kernels": len(kernels),
            "top_cpu_ops": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 1)) for e in ops]}


def main(argv=None) -> int:
    args = parse_args(argv)
    from worker.editing.batch import BatchRunner
    from worker.editing.jobs import P2PJobSpec

    model = load_model(args.model, "text2image", args.device, args.dtype, "ddim")
    source, target = P2P_PAIRS[0]
    runner = BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim")
    job = P2PJobSpec("pair", source, [target], seed=0, edit="replace", cross_replace_steps=0.8,
                     self_replace_steps=0.4, guidance_scale=7.5)
    pipe = diffusers_twin(model, "StableDiffusionPipeline", "ddim")
    sides = {
        "ours (P2P replace)": lambda: check_ok(runner.run([job])),
        "ours, no edit (plain generation through the same hook)": lambda: check_ok(runner.run([P2PJobSpec(
            "plain", source, [target], seed=0, edit="none", guidance_scale=7.5)])),
        "diffusers": lambda: pipe([source, target], generator=torch.Generator().manual_seed(0), height=args.size,
                                  width=args.size, num_inference_steps=args.steps, guidance_scale=7.5),
    }
    rows = {}
    for name, fn in sides.items():
        fn()  # warm-up
        walls = [timed(fn, args.device) for _ in range(args.repeats)]
        prof = profile_once(fn, args.device)
        rows[name] = {"s_per_step": statistics.median(walls) / args.steps, "runs_s": walls,
                      "busy_share": prof["device_busy_s"] / prof["wall_s"] if prof["wall_s"] else None,
                      "kernels_per_step": prof["kernels"] / args.steps, "top_cpu_ops_ms": prof["top_cpu_ops"]}
        print(f"{name}: {rows[name]['s_per_step'] * 1000:.1f} ms/step (whole run incl. text encoding and VAE), "
              f"GPU busy {100 * (rows[name]['busy_share'] or 0):.0f}% of the profiled run, "
              f"{rows[name]['kernels_per_step']:.0f} kernels/step", flush=True)
    print("\ntop CPU-side operators (self ms over one profiled run):")
    for name, row in rows.items():
        print(f"  {name}: " + "; ".join(f"{k} ×{n} {ms}" for k, n, ms in row["top_cpu_ops_ms"][:6]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
                "size": args.size, "steps": args.steps, "dtype": args.dtype}
        (args.out / "gpu-profile.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
