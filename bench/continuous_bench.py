"""Continuous-batching benchmark: one arrival trace replayed through the real worker, request-level vs step-level.

The trace: Poisson arrivals at ``--load`` (default 70 %) of the request-level worker's capacity, a mix of
10/20/30-step jobs, P2P (tiny-sd, one or two targets) and IP2P (tiny-ip2p), from two tenants. Capacity is
measured first: a burst of the same mix, saturated, through the request-level worker (jobs per second).

Both modes run the same worker process code (``python -m worker.runtime.worker``, only
``EDITSERVE_WORKER__BATCHING`` differs) against a private Redis and SeaweedFS; edits are created through the
``JobStore`` as the gateway would. Per mode it prints throughput (jobs / (last completion - first arrival)),
p50/p95/p99 latency (enqueue → succeeded) and mean time to first step (enqueue → progress step 1, polled every
20 ms). Goal: step-level p95 <= 0.6x request-level at >= 1.0x its throughput.

    python bench/continuous_bench.py                 # writes bench/results/continuous-<machine>.txt/.json
    python bench/continuous_bench.py --jobs 24 --max-seconds 400
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import redis  # noqa: E402
from PIL import Image  # noqa: E402

from devtools.devstack import free_port, start_seaweedfs, wait_for_port  # noqa: E402
from editserve.contract import BatchKey, IP2PEditRequest, JobPayload, P2PEditRequest  # noqa: E402
from service.config import S3Settings, Settings  # noqa: E402
from service.jobstore import JobStore, new_edit_id  # noqa: E402
from service.keys import edit_key  # noqa: E402
from service.storage import Storage, input_key  # noqa: E402

try:  # run as a script: bench/ is on sys.path
    from machine import cpu_model  # noqa: E402
except ImportError:  # pragma: no cover
    from bench.machine import cpu_model  # noqa: E402

SIZE = 64
GOAL_P95, GOAL_THROUGHPUT = 0.6, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=32, help="jobs in the trace")
    p.add_argument("--calibration-jobs", type=int, default=12, help="burst that measures capacity")
    p.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of capacity")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--row-budget", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8, help="request-level worker max_batch_size")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard bound on the whole run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--machine", default=None)
    return p.parse_args(argv)


# --- the trace -----------------------------------------------------------------------------------


def make_trace(n: int, rng: random.Random) -> list[dict]:
    """Job shapes (no times): steps 10/20/30, 60 % P2P (1 or 2 targets) / 40 % IP2P, tenants a and b."""
    jobs = []
    for i in range(n):
        jobs.append({"kind": "p2p" if rng.random() < 0.6 else "ip2p", "steps": rng.choice((10, 20, 30)),
                     "targets": rng.choice((1, 2)), "tenant": "tenant-a" if rng.random() < 0.5 else "tenant-b",
                     "seed": 100 + i})
    return jobs


def payload_for(job: dict, storage: Storage, image_png: bytes) -> JobPayload:
    edit_id = new_edit_id()
    if job["kind"] == "p2p":
        targets = ["a photo of a dog", "a photo of a fox"][: job["targets"]]
        req = P2PEditRequest(source_prompt="a photo of a cat", target_prompts=targets, steps=job["steps"],
                             height=SIZE, width=SIZE)
        key = BatchKey(model="tiny-sd", kind="p2p", height=SIZE, width=SIZE, steps=job["steps"], scheduler="ddim")
        return JobPayload(id=edit_id, tenant=job["tenant"], request=req, batch_key=key, seeds=[job["seed"]],
                          created_at=datetime.now(UTC))
    req = IP2PEditRequest(instruction="make it snowy", steps=job["steps"], resolution=SIZE)
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=SIZE, width=SIZE, steps=job["steps"], scheduler="euler_a")
    storage.put_bytes(input_key(edit_id), image_png, "image/png")
    return JobPayload(id=edit_id, tenant=job["tenant"], request=req, batch_key=key, seeds=[job["seed"]],
                      input_image_key=input_key(edit_id), created_at=datetime.now(UTC))


# --- processes -----------------------------------------------------------------------------------


class Stack:
    def __init__(self, args):
        self.args = args
        self.procs: list[subprocess.Popen] = []
        port = free_port()
        self.redis_dir = tempfile.mkdtemp(prefix="editserve-cb-redis-")
        self.procs.append(subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                            "--save", "", "--dir", self.redis_dir],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_port(port)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.s3 = start_seaweedfs()
        s3 = S3Settings(endpoint_url=self.s3.endpoint_url, access_key_id=self.s3.access_key,
                        secret_access_key=self.s3.secret_key, bucket=self.s3.bucket, region=self.s3.region)
        self.settings = Settings(redis_url=self.redis_url, s3=s3)
        self.conn = redis.Redis.from_url(self.redis_url)
        self.storage = Storage(self.settings.s3)
        self.store = JobStore(self.conn, self.settings, self.storage)

    def worker(self, mode: str, name: str) -> subprocess.Popen:
        env = dict(os.environ, **self.s3.env(), EDITSERVE_REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1",
                   EDITSERVE_WORKER__METRICS_PORT="0", EDITSERVE_WORKER__BATCHING=mode,
                   EDITSERVE_WORKER__TORCH_THREADS=str(self.args.torch_threads),
                   EDITSERVE_WORKER__ROW_BUDGET=str(self.args.row_budget),
                   EDITSERVE_WORKER__MAX_BATCH_SIZE=str(self.args.max_batch_size),
                   EDITSERVE_WORKER__POLL_INTERVAL_MS="5", EDITSERVE_LOG_LEVEL="WARNING")
        log = open(Path(tempfile.gettempdir()) / f"editserve-cb-{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "worker.runtime.worker", "--models", "tiny-sd,tiny-ip2p",
                                 "--name", name], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_worker(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.s3.stop()
        shutil.rmtree(self.redis_dir, ignore_errors=True)


# --- one replay ----------------------------------------------------------------------------------


def warm_up(stack: Stack, image: bytes) -> None:
    """One job per model, so model loading and first-call costs stay out of the measurement."""
    ids = [stack.store.create(payload_for({"kind": k, "steps": 2, "targets": 1, "tenant": "warm", "seed": 1},
                                          stack.storage, image), webhook=None, idempotency_key=None)[0].id
           for k in ("p2p", "ip2p")]
    wait_done(stack, ids, {}, time.monotonic() + 300)


def wait_done(stack: Stack, ids: list[str], first_step: dict[str, float], deadline: float) -> None:
    """Poll until every edit is terminal, recording when each first reported progress (epoch seconds)."""
    pending = set(ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} edits not done in time")
        with stack.conn.pipeline() as pipe:
            order = sorted(pending)
            for edit_id in order:
                pipe.hmget(edit_key(edit_id), "status", "progress_step")
            rows = pipe.execute()
        now = time.time()
        for edit_id, (status, step) in zip(order, rows):
            if step is not None and int(step) >= 1 and edit_id not in first_step:
                first_step[edit_id] = now
            if status is not None and status.decode() in ("succeeded", "failed", "canceled"):
                if status.decode() != "succeeded":
                    raise RuntimeError(f"edit {edit_id} ended {status.decode()}")
                pending.discard(edit_id)
        time.sleep(0.02)


def replay(stack: Stack, trace: list[dict], offsets: list[float], image: bytes, deadline: float) -> dict:
    """Submit each job at its offset while polling progress; returns the figures of this replay."""
    ids, created, first_step = [], {}, {}
    t0 = time.time()
    i = 0
    while i < len(trace):
        due = t0 + offsets[i]
        if time.time() >= due:
            payload = payload_for(trace[i], stack.storage, image)
            stack.store.create(payload, webhook=None, idempotency_key=None)
            created[payload.id] = time.time()
            ids.append(payload.id)
            i += 1
            continue
        # poll progress while waiting for the next arrival
        with stack.conn.pipeline() as pipe:
            for edit_id in ids:
                pipe.hget(edit_key(edit_id), "progress_step")
            steps = pipe.execute()
        now = time.time()
        for edit_id, step in zip(ids, steps):
            if step is not None and int(step) >= 1 and edit_id not in first_step:
                first_step[edit_id] = now
        time.sleep(min(0.02, max(0.0, due - time.time())))
    wait_done(stack, ids, first_step, deadline)
    completed = {}
    for edit_id in ids:
        edit = stack.store.get(edit_id)
        completed[edit_id] = edit.completed_at.timestamp()
    latencies = sorted(completed[e] - created[e] for e in ids)
    span = max(completed.values()) - min(created.values())
    ttfs = [first_step.get(e, completed[e]) - created[e] for e in ids]
    return {"jobs": len(ids), "throughput_jobs_per_s": len(ids) / span, "p50_s": pct(latencies, 50),
            "p95_s": pct(latencies, 95), "p99_s": pct(latencies, 99), "mean_time_to_first_step_s": statistics.mean(ttfs),
            "span_s": span}


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def calibrate(stack: Stack, trace: list[dict], image: bytes, deadline: float) -> float:
    """Saturated throughput of the request-level worker on a burst of the trace's mix (jobs per second)."""
    t0 = time.time()
    ids = [stack.store.create(payload_for(job, stack.storage, image), webhook=None, idempotency_key=None)[0].id
           for job in trace]
    wait_done(stack, ids, {}, deadline)
    end = max(stack.store.get(e).completed_at.timestamp() for e in ids)
    return len(ids) / (end - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.max_seconds
    rng = random.Random(args.seed)
    trace = make_trace(args.jobs, rng)
    calibration = make_trace(args.calibration_jobs, random.Random(args.seed + 1))
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (200, 120, 40)).save(buf, format="PNG")
    image = buf.getvalue()
    stack = Stack(args)
    results: dict = {}
    try:
        worker = stack.worker("request", "cb-request")
        warm_up(stack, image)
        capacity = calibrate(stack, calibration, image, deadline)
        rate = args.load * capacity
        gaps = [rng.expovariate(rate) for _ in trace]
        offsets = [sum(gaps[:i]) for i in range(len(trace))]  # the first job arrives at 0
        results["capacity_jobs_per_s"] = capacity
        results["arrival_rate_jobs_per_s"] = rate
        results["request"] = replay(stack, trace, offsets, image, deadline)
        stack.stop_worker(worker)
        worker = stack.worker("step", "cb-step")
        warm_up(stack, image)
        results["step"] = replay(stack, trace, offsets, image, deadline)
        stack.stop_worker(worker)
    finally:
        stack.close()
    req, step = results["request"], results["step"]
    ratios = {"p95": step["p95_s"] / req["p95_s"], "throughput": step["throughput_jobs_per_s"] /
              req["throughput_jobs_per_s"]}
    met = ratios["p95"] <= GOAL_P95 and ratios["throughput"] >= GOAL_THROUGHPUT
    machine = args.machine or cpu_model()
    load = os.getloadavg()
    lines = [
        f"editserve continuous-batching benchmark — {machine} ({os.cpu_count()} cores), torch threads "
        f"{args.torch_threads}, {SIZE}x{SIZE} px tiny models, load average {[round(x, 2) for x in load]}",
        f"trace: {args.jobs} jobs (seed {args.seed}), 10/20/30 steps, P2P (1-2 targets) + IP2P, 2 tenants; "
        f"capacity {results['capacity_jobs_per_s']:.2f} jobs/s (request-level, saturated), arrivals "
        f"{rate:.2f} jobs/s ({args.load:.0%}); row budget {args.row_budget}, max_batch_size {args.max_batch_size}",
        "",
        f"  {'mode':<14}{'throughput/s':>13}{'p50 s':>9}{'p95 s':>9}{'p99 s':>9}{'first step s':>14}",
    ]
    for mode in ("request", "step"):
        r = results[mode]
        lines.append(f"  {mode + '-level':<14}{r['throughput_jobs_per_s']:>13.3f}{r['p50_s']:>9.2f}"
                     f"{r['p95_s']:>9.2f}{r['p99_s']:>9.2f}{r['mean_time_to_first_step_s']:>14.2f}")
    lines += ["", f"step/request: p95 {ratios['p95']:.2f}x (goal <= {GOAL_P95}x), throughput "
              f"{ratios['throughput']:.2f}x (goal >= {GOAL_THROUGHPUT}x) -> {'met' if met else 'NOT met'}",
              f"wall time {time.monotonic() - t_start:.0f}s"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "amd-epyc-2c" if "EPYC" in machine else "".join(c if c.isalnum() else "-" for c in machine.lower())[:40]
    (args.out / f"continuous-{slug}.txt").write_text(text + "\n")
    (args.out / f"continuous-{slug}.json").write_text(json.dumps({**results, "ratios": ratios, "met": met,
                                                                   "machine": machine, "args": {
                                                                       k: str(v) for k, v in vars(args).items()}},
                                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
