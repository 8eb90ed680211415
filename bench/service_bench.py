"""Service benchmark: what the service around the editing core costs, and how fast the gateway takes edits.

(a) end to end: 32 compatible P2P jobs (tiny-sd, one batch key) submitted through the SDK to a LocalStack
    gateway + 1 worker (max_batch_size 8), timed from the first submit to the last ``succeeded``
    (the edits' own ``completed_at``), against the bare ``BatchRunner`` running the same 32 job specs in
    batches of 8 in this process (same model files, same torch threads, warm). Goal: service ≥ 0.95× bare.
    Runs are interleaved (service, bare, service, ...) and medians compared, because this kind of machine
    is shared and noisy. An in-process attribution run (the worker's own ``BatchProcessor`` with timers
    around each stage) then says where the service's extra time goes.
(b) gateway submit throughput: ``POST /v1/edits`` (a valid P2P JSON body) against the real gateway under
    uvicorn (uvloop + httptools, 1 process, no worker: jobs accumulate, flushed afterwards) versus a bare
    FastAPI app with one endpoint answering 202 + JSON, served the same way, same load generator (wrk with a
    Lua script; an asyncio httpx generator if wrk is missing) and concurrency. Goals: ratio ≥ 0.5×, gateway
    p99 < 50 ms.

Everything runs on loopback: a private redis-server on a free port, SeaweedFS ``weed mini``, the gateway
and worker as real processes (``devtools.devstack.LocalStack``). The script bounds its own time
(``--max-seconds``) and stops every process it started, also on failure or Ctrl-C.

    python bench/service_bench.py                 # both parts, writes bench/results/service-<machine>.txt/.json
    python bench/service_bench.py --only b --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOALS = {"a": (">=", 0.95), "b": (">=", 0.5), "b_p99_ms": ("<", 50.0)}
SOURCE, TARGET = "a photo of a cat riding a bicycle", "a photo of a dog riding a bicycle"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="ab", help="subset of the benchmarks, e.g. 'a' or 'b'")
    p.add_argument("--jobs", type=int, default=32, help="(a) jobs per run")
    p.add_argument("--batch", type=int, default=8, help="(a) worker max_batch_size and bare batch size")
    p.add_argument("--size", type=int, default=128, help="(a) height = width in pixels (tiny-sd's default size)")
    p.add_argument("--steps", type=int, default=20, help="(a) denoising steps (64 px and 10 steps: the smallest "
                                                          "jobs, where per-job service costs weigh most)")
    p.add_argument("--repeats", type=int, default=3, help="(a) interleaved service/bare pairs")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="(a) torch intra-op threads, the worker's and the bare runner's alike (0: torch default). "
                        "1 by default: with 2 threads on a shared 2-core box OpenMP's spin-waits made a batch "
                        "10-25x slower whenever other processes wanted the CPU")
    p.add_argument("--batch-wait-ms", type=int, default=None,
                   help="(a) worker max_batch_wait_ms (default: the service's own default)")
    p.add_argument("--duration", type=float, default=10.0, help="(b) seconds of load per server")
    p.add_argument("--warmup", type=float, default=2.0, help="(b) seconds of unmeasured load first")
    p.add_argument("--connections", type=int, default=8, help="(b) concurrent connections")
    p.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument("--max-seconds", type=float, default=900.0, help="hard bound on the whole run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--machine", default=None, help="name in the result files (default: from the CPU)")
    return p.parse_args(argv)


# --- machine -------------------------------------------------------------------------------------

try:  # run as a script: bench/ is on sys.path
    from machine import cpu_model  # noqa: E402
    from signals import signals_interrupt  # noqa: E402
except ModuleNotFoundError:  # imported as bench.service_bench (uvicorn --factory for the (b) baselines)
    from bench.machine import cpu_model  # noqa: E402
    from bench.signals import signals_interrupt  # noqa: E402


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def machine_slug(info: dict[str, Any]) -> str:
    name = info.get("gpu") or f"{info['cpu']}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


# --- the stack (private Redis, S3, processes) -------------------------------------------------------

class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise TimeoutError(f"--max-seconds exceeded before {what}")


class Bench:
    """Owns every process this script starts; ``close()`` stops them all (idempotent)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.redis_server = None
        self.s3 = None
        self.stack = None
        self.redis_dir = Path(tempfile.mkdtemp(prefix="editserve-bench-redis-"))
        self.extra: list[subprocess.Popen] = []

    # ---------------------------------------------------------------- start / stop
    def start_backing(self) -> None:
        from devtools.devstack import ensure_redis, free_port, start_seaweedfs

        port = free_port()
        self.redis_server = ensure_redis(f"redis://127.0.0.1:{port}/0", data_dir=self.redis_dir)
        if self.redis_server.process is None:
            raise RuntimeError(f"port {port} already had a Redis: refusing to benchmark against someone else's")
        self.s3 = start_seaweedfs(bucket="editserve-bench")

    def make_stack(self, extra_env: dict[str, str]):
        from devtools.devstack import LocalStack

        self.stack = LocalStack(redis_url=self.redis_server.url, s3=self.s3, models_dir=REPO / ".models",
                                extra_env=extra_env)
        return self.stack

    def spawn_uvicorn(self, name: str, target: str, port: int, *, factory: bool = False) -> subprocess.Popen:
        """uvicorn, 1 process, uvloop + httptools, no access log: the same flags for both (b) servers."""
        from devtools.devstack import wait_for_http

        args = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
                "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
        if factory:
            args.append("--factory")
        proc = self.stack._spawn(name, args)
        health = "/healthz"
        wait_for_http(f"http://127.0.0.1:{port}{health}", 60, proc, self.stack.log(name))
        return proc

    def close(self) -> None:
        if self.stack is not None:
            try:
                for proc in self.stack.processes.values():  # a SIGSTOPped worker must be able to die
                    if proc.poll() is None:
                        try:
                            os.killpg(proc.pid, signal.SIGCONT)
                        except ProcessLookupError:
                            pass
                self.stack.stop(timeout=10)
            except Exception as exc:  # noqa: BLE001 — keep cleaning
                print(f"warning: stopping the stack: {exc}", file=sys.stderr)
        for proc in self.extra:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self.s3 is not None:
            self.s3.stop()
            if self.s3.data_dir:
                shutil.rmtree(self.s3.data_dir, ignore_errors=True)
            self.s3 = None
        if self.redis_server is not None:
            try:
                self.redis_server.stop()
            except Exception:  # noqa: BLE001
                if self.redis_server.process is not None:
                    self.redis_server.process.kill()
            self.redis_server = None
        shutil.rmtree(self.redis_dir, ignore_errors=True)


@contextmanager
def paused(proc: subprocess.Popen):
    """SIGSTOP a process group for the bare runs (an idle worker still polls Redis), SIGCONT after."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGCONT)


# --- (a) end to end vs bare BatchRunner --------------------------------------------------------------

def p2p_fields(args, seed: int) -> dict[str, Any]:
    return {"edit": "replace", "steps": args.steps, "height": args.size, "width": args.size, "seed": seed}


async def submit_all(base_url: str, args, seeds: list[int]) -> tuple[float, list[str]]:
    """Submit every job through the async SDK, 8 in flight; returns (wall time of the first submit, ids)."""
    from editserve import AsyncClient

    sem = asyncio.Semaphore(8)
    async with AsyncClient(base_url, timeout=30, retries=0) as client:
        await client.models()  # connection set up before the clock starts

        async def one(seed: int) -> str:
            async with sem:
                edit = await client.submit_p2p(SOURCE, [TARGET], **p2p_fields(args, seed))
                return edit.id

        t_first = time.time()
        ids = await asyncio.gather(*(one(s) for s in seeds))
    return t_first, list(ids)


def wait_terminal(conn, ids: list[str], timeout: float) -> None:
    """Block until every edit is terminal (watching the JobStore's records; cheap for the machine)."""
    from service.keys import edit_key

    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} edits not finished after {timeout}s")
        pipe = conn.pipeline(transaction=False)
        order = sorted(pending)
        for i in order:
            pipe.hget(edit_key(i), "status")
        for i, status in zip(order, pipe.execute()):
            if status in (b"succeeded", b"failed", b"canceled"):
                pending.discard(i)
        time.sleep(0.05)


def batch_events(log_path: Path, since_offset: int) -> list[dict[str, Any]]:
    """The worker's JSON ``batch`` log lines written after ``since_offset``."""
    events = []
    with log_path.open("rb") as f:
        f.seek(since_offset)
        for raw in f.read().decode(errors="replace").splitlines():
            start = raw.find('{"event":"batch"')
            if start >= 0:
                try:
                    events.append(json.loads(raw[start:]))
                except ValueError:
                    pass
    return events


def service_run(bench: Bench, args, seeds: list[int], conn, deadline: Deadline) -> dict[str, Any]:
    from editserve import Client

    stack = bench.stack
    log_path = stack.log("worker-1")
    offset = log_path.stat().st_size
    t_first, ids = asyncio.run(submit_all(stack.base_url, args, seeds))
    t_submitted = time.time()
    wait_terminal(conn, ids, timeout=max(30.0, min(600.0, deadline.left())))
    with Client(stack.base_url, timeout=30) as client:
        edits = [client.get(i) for i in ids]
    bad = [e for e in edits if e.status.value != "succeeded" or len(e.results) != 2]
    if bad:
        raise RuntimeError(f"service run: {len(bad)} edits did not succeed, e.g. {bad[0].id}: {bad[0].error}")
    t_last = max(e.completed_at.timestamp() for e in edits)
    first_start = min(e.started_at.timestamp() for e in edits)
    time.sleep(0.3)  # the last batch line is logged right after the last completion
    events = batch_events(log_path, offset)
    wall = t_last - t_first
    sizes = sorted((e.metrics.batch_id, e.metrics.batch_size) for e in edits)
    batches = {}
    for batch_id, size in sizes:
        batches[batch_id] = size
    return {"ids": ids, "seconds": wall, "jobs_per_s": len(ids) / wall,
            "submit_seconds": t_submitted - t_first, "first_start_after_s": first_start - t_first,
            "batch_sizes": sorted(batches.values(), reverse=True),
            "batch_seconds_sum": sum(e["seconds"] for e in events),
            "batch_run_seconds_sum": sum(e.get("run_seconds", 0.0) for e in events),
            "gather_ms": [e.get("gather_ms") for e in events]}


def bare_specs(conn, ids: list[str]):
    """The very job specs the worker ran: the stored payloads through the worker's own translation."""
    from editserve.contract import JobPayload
    from service.keys import edit_key
    from worker.runtime.execute import to_job_spec

    return [to_job_spec(JobPayload.model_validate_json(conn.hget(edit_key(i), "payload"))) for i in ids]


def bare_run(runner, specs, batch: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    for k in range(0, len(specs), batch):
        results = runner.run(specs[k:k + batch])
        bad = [r for r in results if not r.ok]
        if bad:
            raise RuntimeError(f"bare run failed: {bad[0].job_id}: {bad[0].error!r}")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "jobs_per_s": len(specs) / seconds}


def bench_end_to_end(bench: Bench, args, deadline: Deadline) -> dict[str, Any]:
    import redis
    import torch

    from bench.core_bench import load_model
    from editserve import Client
    from worker.editing.batch import BatchRunner

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    threads = torch.get_num_threads()
    env = {"EDITSERVE_WORKER__MAX_BATCH_SIZE": str(args.batch), "EDITSERVE_WORKER__METRICS_PORT": "0",
           "EDITSERVE_WORKER__TORCH_THREADS": str(threads),
           # per-tenant admission limits are not what (a) measures: one tenant sends the whole burst
           "EDITSERVE_LIMITS__TENANT_RPS": "1000000", "EDITSERVE_LIMITS__TENANT_BURST": "1000000",
           "EDITSERVE_LIMITS__TENANT_MAX_QUEUED": "1000000", "EDITSERVE_LIMITS__TENANT_MAX_CONCURRENT": "1000000"}
    if args.batch_wait_ms is not None:
        env["EDITSERVE_WORKER__MAX_BATCH_WAIT_MS"] = str(args.batch_wait_ms)
    stack = bench.make_stack(env)
    stack.start_gateway()
    worker = stack.start_worker("worker-1", models="tiny-sd")
    conn = redis.Redis.from_url(bench.redis_server.url)
    log_path = stack.log("worker-1")
    t0 = time.monotonic()
    while '"event":"worker_started"' not in (log_path.read_text(errors="replace") if log_path.exists() else ""):
        if worker.poll() is not None or time.monotonic() - t0 > 120:
            raise RuntimeError(f"worker did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)

    model = load_model(REPO / ".models" / "tiny-sd", "text2image", "cpu", "float32", "ddim")
    runner = BatchRunner(model, height=args.size, width=args.size, steps=args.steps, scheduler="ddim")

    # warm-up: one service batch (worker kernels, gateway imports) and one bare batch
    print("(a) warm-up ...", flush=True)
    warm = service_run(bench, args, list(range(1000, 1000 + args.batch)), conn, deadline)
    with paused(worker):
        bare_run(runner, bare_specs(conn, warm["ids"]), args.batch)

    service_rows, bare_rows = [], []
    for rep in range(args.repeats):
        deadline.check(f"(a) repeat {rep + 1}")
        seeds = list(range(rep * 1000, rep * 1000 + args.jobs))
        s = service_run(bench, args, seeds, conn, deadline)
        with paused(worker):
            b = bare_run(runner, bare_specs(conn, s["ids"]), args.batch)
        s.pop("ids")
        service_rows.append(s)
        bare_rows.append(b)
        print(f"(a) repeat {rep + 1}: service {s['seconds']:.2f}s ({s['jobs_per_s']:.2f} jobs/s, batches "
              f"{s['batch_sizes']}), bare {b['seconds']:.2f}s ({b['jobs_per_s']:.2f} jobs/s)", flush=True)

    # attribution: the worker's own BatchProcessor in this process, with timers around each stage
    with paused(worker):
        attribution = attribute_worker_time(bench, args, model, deadline)
    with Client(stack.base_url) as client:
        client.models()
    stack.stop()
    bench.stack = None
    conn.flushdb()

    svc_s = statistics.median(r["seconds"] for r in service_rows)
    bare_s = statistics.median(r["seconds"] for r in bare_rows)
    return {"name": "a", "jobs": args.jobs, "batch": args.batch, "size": args.size, "steps": args.steps,
            "torch_threads": threads, "batch_wait_ms": args.batch_wait_ms,
            "service_s": svc_s, "bare_s": bare_s, "service_jobs_per_s": args.jobs / svc_s,
            "bare_jobs_per_s": args.jobs / bare_s, "ratio_of_medians": bare_s / svc_s,
            # the headline: pairs ran back to back, so each pair's ratio cancels the machine's drift
            "ratio": statistics.median(b["seconds"] / s["seconds"] for s, b in zip(service_rows, bare_rows)),
            "pair_ratios": [b["seconds"] / s["seconds"] for s, b in zip(service_rows, bare_rows)],
            "service_runs": service_rows, "bare_runs": bare_rows, "attribution": attribution}


def attribute_worker_time(bench: Bench, args, model, deadline: Deadline) -> dict[str, Any]:
    """Run the worker's code path (gather → BatchProcessor) in this process with a timer on every stage.

    Same settings as the worker process; the jobs are queued straight into the JobStore (no HTTP), all
    before the first gather, so the gather window is not part of this picture (the e2e runs show it).
    """
    import redis

    from editserve.contract import BatchKey, JobPayload, P2PEditRequest
    from service.config import S3Settings, Settings, WorkerSettings
    from service.jobstore import new_edit_id
    from worker.models.registry import ModelRegistry
    from worker.runtime import processing, uploads
    from worker.runtime.worker import EditWorker

    s3 = bench.s3
    settings = Settings(redis_url=bench.redis_server.url,
                        s3=S3Settings(endpoint_url=s3.endpoint_url, access_key_id=s3.access_key,
                                      secret_access_key=s3.secret_key, bucket=s3.bucket, region=s3.region),
                        worker=WorkerSettings(max_batch_size=args.batch, metrics_port=0, torch_threads=args.torch_threads,
                                              **({"max_batch_wait_ms": args.batch_wait_ms}
                                                 if args.batch_wait_ms is not None else {})))
    registry = ModelRegistry(settings)
    registry._loaded["tiny-sd"] = model  # the very model object the bare runs use
    w = EditWorker(settings, ["tiny-sd"], "bench-inproc", connection=redis.Redis.from_url(settings.redis_url),
                   registry=registry)
    w.load_models()
    w.bridge.register()
    timers: dict[str, list[float]] = {}
    main_thread = threading.main_thread()

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:  # work done by the worker's helper threads is off the batch's critical path
                label = name if threading.current_thread() is main_thread else f"[helper thread] {name}"
                timers.setdefault(label, []).append(time.perf_counter() - t)
        return wrapper

    originals = (processing.run_with_split, processing.upload_outputs, uploads.png_bytes,
                 processing.BatchProcessor.__dict__.get("_uploaded"))
    processing.run_with_split = timed("denoise+decode (BatchRunner.run)", processing.run_with_split)
    processing.upload_outputs = timed("upload_outputs (PNG encode + S3 PUTs)", processing.upload_outputs)
    uploads.png_bytes = timed("PNG encode", uploads.png_bytes)
    if originals[3] is not None:  # the worker uploads in a pool: what the finish loop waits for
        processing.BatchProcessor._uploaded = staticmethod(timed("waiting for uploads", originals[3].__func__))
    store, bridge = w.store, w.bridge
    store.set_progress = timed("progress writes (set_progress)", store.set_progress)
    store.is_cancel_requested = timed("cancel checks", store.is_cancel_requested)
    store.mark_processing = timed("mark_processing", store.mark_processing)
    store.mark_succeeded = timed("mark_succeeded (+publish, webhook emit)", store.mark_succeeded)
    store.load_payload = timed("load_payload (+JSON decode)", store.load_payload)
    bridge.start = timed("RQ start (Execution)", bridge.start)
    bridge.renew = timed("heartbeats (RQ renew)", bridge.renew)
    bridge.owns = timed("RQ owns check", bridge.owns)
    bridge.succeed = timed("RQ succeed (Result, registries)", bridge.succeed)
    w.gatherer.gather = timed("gather (claim + Job.fetch)", w.gatherer.gather)
    # the loop hands each ran batch to the finisher thread: what is left of finishing on the critical path is
    # the loop waiting for the previous batch's finishing, and for the last batch's (the drain)
    w.finisher.wait = timed("waiting for the finisher thread", w.finisher.wait)
    w.processor.bridge = bridge
    try:
        key = BatchKey(model="tiny-sd", kind="p2p", height=args.size, width=args.size, steps=args.steps,
                       scheduler="ddim")
        from datetime import UTC, datetime

        def payload(seed):
            req = P2PEditRequest(source_prompt=SOURCE, target_prompts=[TARGET], edit="replace", steps=args.steps,
                                 height=args.size, width=args.size, seed=seed)
            return JobPayload(id=new_edit_id(), tenant="bench", request=req, batch_key=key, seeds=[seed],
                              created_at=datetime.now(UTC))

        for rnd in range(2):  # round 0 warms, round 1 is measured
            timers.clear()
            for s in range(args.jobs):
                store.create(payload(5000 + rnd * 100 + s), webhook=None, idempotency_key=None)
            t0 = time.perf_counter()
            done = 0
            while done < args.jobs:  # the worker process's loop: run_batch, whose finishing overlaps the next
                deadline.check("(a) attribution")
                batch = w.run_batch(timeout=2.0)
                if batch is None:
                    raise RuntimeError("in-process worker found no job")
                done += batch.size
            w.drain()  # every job terminal, as in the end-to-end runs
            total = time.perf_counter() - t0
    finally:
        processing.run_with_split, processing.upload_outputs, uploads.png_bytes = originals[:3]
        if originals[3] is not None:
            processing.BatchProcessor._uploaded = originals[3]
        w.bridge.unregister()
    stages = {k: sum(v) for k, v in timers.items()}
    # on the loop's thread, on_step's Redis work runs inside BatchRunner.run: take it out of the denoise
    # figure; PNG encoding runs inside upload_outputs
    inside = sum(stages.get(k, 0.0) for k in ("progress writes (set_progress)", "cancel checks",
                                               "heartbeats (RQ renew)"))
    nested = {"PNG encode"}
    if "waiting for uploads" in stages:
        nested.add("upload_outputs (PNG encode + S3 PUTs)")
    accounted = sum(v for k, v in stages.items() if not k.startswith("[helper") and k not in nested)
    # finishing that the next batch waits for: the loop waiting for the finisher thread (the finisher's own
    # stages are [helper thread]); run synchronously, uploads waited for, the JobStore marks, RQ bookkeeping
    finishing = sum(stages.get(k, 0.0) for k in ("waiting for uploads", "mark_succeeded (+publish, webhook emit)",
                                                  "RQ succeed (Result, registries)", "RQ owns check",
                                                  "waiting for the finisher thread"))
    if "waiting for uploads" not in stages:
        finishing += stages.get("upload_outputs (PNG encode + S3 PUTs)", 0.0)
    return {"total_s": total, "stages_s": stages, "calls": {k: len(v) for k, v in timers.items()},
            "inside_denoise_s": inside, "unaccounted_s": total - accounted, "finishing_s": finishing,
            "compute_s": stages.get("denoise+decode (BatchRunner.run)", 0.0) - inside,
            "overhead_share": 1 - (stages.get("denoise+decode (BatchRunner.run)", 0.0) - inside) / total}


# --- (b) gateway submit throughput ------------------------------------------------------------------

def make_bare_app():
    """The (b) baseline: FastAPI, one POST endpoint reading its JSON body and answering 202 + JSON."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    async def create(request):
        body = await request.json()
        return JSONResponse({"id": "01bench", "status": "queued", "kind": body.get("kind")}, status_code=202)

    async def healthz():
        return {"status": "ok"}

    create.__annotations__ = {"request": Request}  # this module's postponed annotations would hide the type
    app.add_api_route("/v1/edits", create, methods=["POST"], status_code=202)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    return app


def make_bare_redis_app():
    """A reference between the two: the bare app plus one pipelined Redis round trip (HSET + RPUSH), which is
    what durably queueing an edit costs at the least."""
    import os as _os
    import uuid as _uuid

    import redis.asyncio as aioredis
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    conn = aioredis.Redis.from_url(_os.environ.get("EDITSERVE_REDIS_URL", "redis://127.0.0.1:6379/0"))

    async def create(request):
        body = await request.body()
        edit_id = _uuid.uuid4().hex
        async with conn.pipeline(transaction=True) as pipe:
            pipe.hset(f"bench:edit:{edit_id}", mapping={"status": "queued", "payload": body})
            pipe.rpush("bench:queue", edit_id)
            await pipe.execute()
        return JSONResponse({"id": edit_id, "status": "queued"}, status_code=202)

    async def healthz():
        return {"status": "ok"}

    create.__annotations__ = {"request": Request}
    app.add_api_route("/v1/edits", create, methods=["POST"], status_code=202)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    return app


P2P_BODY = json.dumps({"kind": "p2p", "source_prompt": SOURCE, "target_prompts": [TARGET], "edit": "replace",
                       "steps": 10, "height": 64, "width": 64, "seed": 1})

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"status_errors":%%d,"connect":%%d,' ..
    '"read":%%d,"write":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,"mean_us":%%f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def run_wrk(url: str, seconds: float, connections: int, script: Path) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk produced no summary: {out.stdout[-1000:]} {out.stderr[-1000:]}")
    r = json.loads(line[len("WRKJSON "):])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


async def _httpx_load(url: str, seconds: float, connections: int) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=5) as client:
        async def loop():
            nonlocal errors
            while time.monotonic() < end:
                t = time.perf_counter()
                r = await client.post(url, content=P2P_BODY, headers={"content-type": "application/json"})
                lat.append(time.perf_counter() - t)
                errors += r.status_code >= 300
        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(connections)))
        dur = time.monotonic() - t0
    lat.sort()

    def pct(p):
        return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e6

    return {"requests": len(lat), "duration_us": dur * 1e6, "status_errors": errors, "p50_us": pct(50),
            "p90_us": pct(90), "p99_us": pct(99), "max_us": lat[-1] * 1e6, "rps": len(lat) / dur}


def load(url: str, seconds: float, connections: int, gen: str, script: Path) -> dict[str, Any]:
    if gen == "wrk":
        return run_wrk(url, seconds, connections, script)
    return asyncio.run(_httpx_load(url, seconds, connections))


def queued(conn) -> int:
    """Edits waiting in the RQ edit queues (the lists only: rq keeps string keys under the same prefix)."""
    return sum(conn.llen(k) for k in conn.scan_iter("rq:queue:edits.*", _type="list")
               if not k.endswith(b":intermediate"))


def bench_gateway(bench: Bench, args, deadline: Deadline) -> dict[str, Any]:
    import httpx
    import redis

    from devtools.devstack import free_port

    gen = args.loadgen
    if gen == "auto":
        gen = "wrk" if shutil.which("wrk") else "httpx"
    env = {"EDITSERVE_LIMITS__TENANT_RPS": "1000000000", "EDITSERVE_LIMITS__TENANT_BURST": "1000000000",
           "EDITSERVE_LIMITS__TENANT_MAX_QUEUED": "1000000000", "EDITSERVE_LIMITS__TENANT_MAX_CONCURRENT": "1000000000",
           "EDITSERVE_LIMITS__MAX_QUEUE_DEPTH": "1000000000"}
    stack = bench.make_stack(env)
    script = Path(tempfile.mkstemp(prefix="editserve-wrk-", suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % P2P_BODY)
    conn = redis.Redis.from_url(bench.redis_server.url)
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, target, factory in (("gateway", "service.app:app", False),
                                      ("bare-fastapi", "bench.service_bench:make_bare_app", True),
                                      ("bare+redis", "bench.service_bench:make_bare_redis_app", True)):
            deadline.check(f"(b) {name}")
            port = free_port()
            bench.spawn_uvicorn(name, target, port, factory=factory)
            url = f"http://127.0.0.1:{port}/v1/edits"
            probe = httpx.post(url, content=P2P_BODY, headers={"content-type": "application/json"}, timeout=10)
            if probe.status_code != 202:
                raise RuntimeError(f"{name}: POST /v1/edits answered {probe.status_code}: {probe.text[:500]}")
            print(f"(b) {name}: warm-up {args.warmup:.0f}s, then {args.duration:.0f}s with {gen}, "
                  f"{args.connections} connections ...", flush=True)
            load(url, args.warmup, args.connections, gen, script)
            queued_before = queued(conn)
            r = load(url, args.duration, args.connections, gen, script)
            r["queued_after"] = queued(conn)
            r["queued_before"] = queued_before
            if name == "gateway":  # service time without queueing: one connection, a shorter run
                r["single"] = load(url, max(3.0, args.duration / 2), 1, gen, script)
            rows[name] = r
            stack.stop(name)
            conn.flushdb()  # the accumulated jobs
            print(f"(b) {name}: {r['rps']:.0f} req/s, p50 {r['p50_us'] / 1000:.1f} ms, "
                  f"p99 {r['p99_us'] / 1000:.1f} ms, non-2xx {r['status_errors']}", flush=True)
    finally:
        script.unlink(missing_ok=True)
        stack.stop()
        bench.stack = None
        conn.flushdb()
    gw, bare = rows["gateway"], rows["bare-fastapi"]
    if gw["status_errors"]:
        raise RuntimeError(f"gateway answered {gw['status_errors']} non-2xx responses under load")
    return {"name": "b", "loadgen": gen, "connections": args.connections, "duration_s": args.duration,
            "gateway": gw, "bare": bare, "bare_redis": rows["bare+redis"], "ratio": gw["rps"] / bare["rps"],
            "gateway_p50_ms": gw["p50_us"] / 1000, "gateway_p99_ms": gw["p99_us"] / 1000,
            "gateway_single_p50_ms": gw["single"]["p50_us"] / 1000,
            "gateway_single_p99_ms": gw["single"]["p99_us"] / 1000}


# --- report ----------------------------------------------------------------------------------------

def met(value: float, goal: tuple[str, float]) -> str:
    op, target = goal
    ok = value >= target if op == ">=" else value < target
    return f"{'met' if ok else 'MISSED'} (goal {op} {target:g})"


def render(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"editserve service benchmark — {info.get('gpu') or info['cpu']} ({info['cores']} cores, "
             f"torch {info['torch']} [default {info['torch_threads']} threads], python {info['python']}); "
             f"load average at start {info.get('loadavg_at_start')}", ""]
    for r in rows:
        if r["name"] == "a":
            lines += [
                f"(a) {r['jobs']} P2P jobs, tiny-sd {r['size']}x{r['size']} px, {r['steps']} steps, one batch key; "
                f"service = SDK → gateway → Redis/RQ → 1 worker (max_batch_size {r['batch']}, max_batch_wait_ms "
                f"{r['batch_wait_ms'] if r['batch_wait_ms'] is not None else 'default'}) → S3, first submit → "
                f"last succeeded; bare = BatchRunner, batches of {r['batch']}, same specs, in-process, warm; "
                f"{r['torch_threads']} torch thread(s) in both; "
                f"median of {len(r['service_runs'])} interleaved pairs",
                f"    {'':<10}{'seconds':>9}{'jobs/s':>9}",
                f"    {'service':<10}{r['service_s']:>9.2f}{r['service_jobs_per_s']:>9.2f}",
                f"    {'bare':<10}{r['bare_s']:>9.2f}{r['bare_jobs_per_s']:>9.2f}",
                f"    service/bare throughput ratio (median of the pairs' ratios) {r['ratio']:.2f}x  "
                f"{met(r['ratio'], GOALS['a'])}; per pair: {', '.join(f'{x:.2f}' for x in r['pair_ratios'])}; "
                f"ratio of the medians {r.get('ratio_of_medians', r['ratio']):.2f}x",
                "    per service run: " + "; ".join(
                    f"{s['seconds']:.2f}s batches {s['batch_sizes']} submit {s['submit_seconds']:.2f}s "
                    f"Σbatch {s['batch_seconds_sum']:.2f}s" for s in r["service_runs"]),
            ]
            att = r["attribution"]
            lines.append(f"    where the worker's time goes (in-process, {r['jobs']} jobs pre-queued, "
                         f"{att['total_s']:.2f}s total):")
            for k, v in sorted(att["stages_s"].items(), key=lambda kv: -kv[1]):
                lines.append(f"      {k:<44}{v:>8.3f}s  ({att['calls'][k]} calls)")
            lines.append(f"      {'(on-thread progress/cancel/heartbeat, inside denoise)':<44}"
                         f"{att['inside_denoise_s']:>8.3f}s")
            lines.append(f"      {'other (loop, logging, bookkeeping)':<44}{att['unaccounted_s']:>8.3f}s")
            lines.append(f"      pure compute {att['compute_s']:.3f}s → service overhead on the worker's critical path "
                         f"{100 * att['overhead_share']:.1f}% (ceiling for the ratio: {1 - att['overhead_share']:.2f})")
            lines.append(f"      finishing batches, left on the critical path (waits for the finisher thread) "
                         f"{att['finishing_s']:.3f}s: with none left, the ceiling would be "
                         f"{att['compute_s'] / (att['total_s'] - att['finishing_s']):.2f}")
            # work on the helper threads is off the critical path, not free: it shares the CPU (and the GIL)
            # with the denoising loop, whose time then grows; the bare runs are the reference for that
            slower = 100 * (att["compute_s"] / r["bare_s"] - 1)
            lines.append(f"      denoise here vs the bare runs (same specs): {att['compute_s']:.3f}s vs "
                         f"{r['bare_s']:.3f}s ({slower:+.1f}%); in-process worker vs bare: "
                         f"{r['bare_s'] / att['total_s']:.2f}")
            lines.append("")
        if r["name"] == "b":
            gw, bare = r["gateway"], r["bare"]
            lines += [
                f"(b) POST /v1/edits (P2P JSON), uvicorn 1 process uvloop+httptools, {r['loadgen']} "
                f"{r['connections']} connections, {r['duration_s']:.0f}s each after warm-up, no worker",
                f"    {'':<18}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}{'non-2xx':>9}",
            ]
            for label, x in (("gateway", gw), ("bare FastAPI", bare), ("bare + 1 Redis RT", r["bare_redis"]),
                             ("gateway, 1 conn", gw["single"])):
                lines.append(f"    {label:<18}{x['rps']:>9.0f}{x['p50_us'] / 1000:>9.2f}{x['p90_us'] / 1000:>9.2f}"
                             f"{x['p99_us'] / 1000:>9.2f}{x['max_us'] / 1000:>9.2f}{x['status_errors']:>9}")
            lines += [f"    gateway/bare ratio {r['ratio']:.2f}x  {met(r['ratio'], GOALS['b'])}; gateway p99 "
                      f"{r['gateway_p99_ms']:.1f} ms at {r['connections']} connections "
                      f"{met(r['gateway_p99_ms'], GOALS['b_p99_ms'])}, {r['gateway_single_p99_ms']:.1f} ms at 1; "
                      f"queue held {gw['queued_after']} edits at the end", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    deadline = Deadline(args.max_seconds)
    from worker.models.builders import ensure_tiny_models

    ensure_tiny_models(REPO / ".models")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load average {info.get('loadavg_at_start')}", flush=True)
    bench = Bench(args)
    rows = []
    with signals_interrupt():
        try:
            bench.start_backing()
            if "a" in args.only:
                rows.append(bench_end_to_end(bench, args, deadline))
            if "b" in args.only:
                rows.append(bench_gateway(bench, args, deadline))
        finally:
            bench.close()
    table = render(info, rows)
    print("\n" + table)
    slug = args.machine or machine_slug(info)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"service-{slug}.txt").write_text(table + "\n")
    report = {"machine": info, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "results": rows}
    (args.out / f"service-{slug}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {args.out / f'service-{slug}.txt'} and .json")
    return report


if __name__ == "__main__":
    main()
