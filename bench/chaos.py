"""Chaos run: a few hundred edits through the whole stack while workers are SIGKILLed and Redis restarts.

What it does, all on loopback:
- a private ``redis-server`` with ``appendonly yes`` + ``appendfsync always`` on a free port
  (``devtools.devstack.PersistentRedis``), SeaweedFS, the gateway, the webhook sender and 2–3 workers
  (``LocalStack``), and a webhook receiver (the loopback allow-listed) that verifies every signature;
- submits ``--jobs`` edits through the SDK over ``--duration`` seconds: P2P (replace/refine) and IP2P
  (some as 2-cell sweeps), tiny models, 64 px, 4 steps; a third with webhooks, a few canceled;
- meanwhile, every few seconds: SIGKILL a worker (restarted 1–3 s later), or restart Redis (SIGTERM or
  SIGKILL, 1–2 s down, same port and data dir); any process that exits on its own is restarted, like a
  supervisor would, and counted;
- hostile load beside it (issue 9, ``bench/hostile.py``): the workers reach S3 through a proxy that goes down
  for ``--s3-outage`` seconds (longer than their upload retries), one extra worker whose every denoising step
  takes ``--long-step`` seconds (longer than the heartbeat TTL), and an attacker sending huge mappings and
  lists, aspect-ratio bombs, large-picture PNGs and bursts of 220 concurrent connections; a health probe
  times ``/healthz`` meanwhile;
- then stops the chaos, waits for every accepted edit to be terminal and for the webhooks to settle,
  and checks each edit through the API, S3, the event stream, the webhooks received and the worker logs.

Printed (and saved to bench/results/chaos-<machine>.txt): jobs accepted, succeeded, failed (grouped by
reason), canceled, **lost** (accepted but neither terminal nor visible: must be 0), **duplicated** (two
terminal transitions, results inconsistent with one attempt, or two different ``completed`` webhooks: must
be 0), run twice, webhook deliveries verified, the attacker's answers by status, the health probe's p99
during the attack (goal < 100 ms), the gateway's peak RSS against its stated bound, and Redis's key count
before and after the workload. Exit status 1 when lost or duplicated is not 0.

    python bench/chaos.py                       # ~6-9 minutes on a 2-core box
    python bench/chaos.py --jobs 60 --duration 40 --settle 120   # a quick one
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from signals import signals_interrupt  # noqa: E402  (bench/ is the script's folder)

SIZE, STEPS = 64, 4
GATEWAY_IDLE_MB = 300  # the gateway at rest with its tokenizers loaded (README, "Limits and security")
DECODE_BYTES_PER_PIXEL = 20  # one decode at its worst (RGBA): five 4-byte-per-pixel pictures alive at once
TERMINAL = {"succeeded", "failed", "canceled"}


RETENTION_VARIABLES = ("EDITSERVE_RETENTION__RECORD_TTL_SECONDS", "EDITSERVE_RETENTION__IDEMPOTENCY_TTL_SECONDS",
                       "EDITSERVE_RETENTION__STATS_TTL_SECONDS", "EDITSERVE_WORKER__RESULT_TTL_SECONDS",
                       "EDITSERVE_WEBHOOKS__STATE_TTL_SECONDS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--duration", type=float, default=150.0, help="seconds of submissions and chaos")
    p.add_argument("--settle", type=float, default=240.0, help="max seconds to wait for every edit afterwards")
    p.add_argument("--max-seconds", type=float, default=590.0, help="hard bound on the whole run")
    p.add_argument("--chaos-interval", type=float, nargs=2, default=(6.0, 12.0), metavar=("MIN", "MAX"))
    p.add_argument("--max-retries", type=int, default=3, help="worker.max_retries (crashes tolerated per edit)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--machine", default=None)
    p.add_argument("--s3-outage", type=float, default=20.0, help="seconds the workers' S3 is unreachable (0: none)")
    p.add_argument("--long-step", type=float, default=7.0, help="step time of the extra slow worker (0: none)")
    p.add_argument("--hostile-rounds", type=int, default=4, help="rounds of the attacker (0: none)")
    p.add_argument("--retention", type=int, default=0, help="Redis retention TTLs in seconds (records, results, "
                   "idempotency, stats, webhook state); then wait for the workload to age out (0: days, no wait)")
    return p.parse_args(argv)


def machine_slug() -> str:
    cpu = "unknown-cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return re.sub(r"[^a-z0-9]+", "-", f"{cpu}-{os.cpu_count()}c".lower()).strip("-")[:60]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- webhook receiver ---------------------------------------------------------------------------------

class Hooks:
    """Everything the receiver saw: (webhook-id, type, edit id, status in the payload, signature ok)."""

    def __init__(self, secret: str):
        self.secret = secret
        self.lock = threading.Lock()
        self.received: list[tuple[str, str, str, str, bool]] = []

    def handler(self):
        hooks = self

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self):
                from editserve import verify_webhook

                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                msg_id = self.headers.get("webhook-id", "?")
                try:
                    event = verify_webhook(hooks.secret, dict(self.headers), body)
                    row = (msg_id, event.type, event.data.id, event.data.status.value, True)
                except Exception:  # noqa: BLE001 — recorded as unverified
                    try:
                        data = json.loads(body).get("data", {})
                    except ValueError:
                        data = {}
                    row = (msg_id, "?", data.get("id", "?"), data.get("status", "?"), False)
                with hooks.lock:
                    hooks.received.append(row)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        return Receiver


# --- the run ------------------------------------------------------------------------------------------

@dataclass
class Submitted:
    id: str
    kind: str
    outputs: int
    webhook: bool
    cancel: bool = False


@dataclass
class State:
    accepted: dict[str, Submitted] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    exits: Counter = field(default_factory=Counter)
    terminal_events: dict[str, set] = field(default_factory=lambda: defaultdict(set))  # id → {(status, rev)}
    lock: threading.Lock = field(default_factory=threading.Lock)


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.state = State()
        self.stop_event = threading.Event()
        self.redis = None
        self.s3 = None
        self.stack = None
        self.hook_server = None
        self.hooks: Hooks | None = None
        self.worker_names = [f"worker-{i + 1}" for i in range(args.workers)]
        self.procs_lock = threading.Lock()  # chaos thread and supervisor both (re)start processes
        self.slow_worker = "slowstep-1" if args.long_step > 0 else None
        self.s3_proxy = None
        self.probe = None
        self.hostile = None
        self.redis_keys: dict[str, int] = {}
        self.gateway_peak_mb: float | None = None

    def all_workers(self) -> list[str]:
        return self.worker_names + ([self.slow_worker] if self.slow_worker else [])

    def start_worker(self, name: str) -> None:
        """Workers reach S3 through the outage proxy; the slow one sleeps in every denoising step."""
        env = {"EDITSERVE_S3__ENDPOINT_URL": f"http://{self.s3_proxy.address}"}
        if name == self.slow_worker:
            env["EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS"] = str(self.args.long_step)
        self.stack.start_worker(name, env=env)

    # ---------------------------------------------------------------- setup / teardown
    def start(self) -> None:
        from service.config import Settings
        from urllib.parse import urlsplit

        from devtools.devstack import LocalStack, free_port, start_persistent_redis, start_seaweedfs
        from devtools.faultproxy import TcpProxy
        from worker.models.builders import ensure_tiny_models

        ensure_tiny_models(REPO / ".models")
        self.redis = start_persistent_redis()
        self.s3 = start_seaweedfs(bucket="editserve-chaos")
        endpoint = urlsplit(self.s3.endpoint_url)
        self.s3_proxy = TcpProxy(endpoint.hostname, endpoint.port)
        self.hooks = Hooks(Settings().webhooks.secret)
        port = free_port()
        self.hook_server = ThreadingHTTPServer(("127.0.0.1", port), self.hooks.handler())
        threading.Thread(target=self.hook_server.serve_forever, daemon=True).start()
        self.hook_url = f"http://127.0.0.1:{port}/hook"
        env = {
            "EDITSERVE_WORKER__HEARTBEAT_TTL_SECONDS": "5", "EDITSERVE_WORKER__REAPER_INTERVAL_SECONDS": "1",
            "EDITSERVE_WORKER__MAX_RETRIES": str(self.args.max_retries), "EDITSERVE_WORKER__TORCH_THREADS": "1",
            "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "100", "EDITSERVE_WORKER__STRANDED_CLAIM_SECONDS": "10",
            "EDITSERVE_WORKER__METRICS_PORT": "0", "EDITSERVE_WEBHOOKS__METRICS_PORT": "0",
            "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]', "EDITSERVE_WEBHOOKS__BACKOFF_SECONDS": "[0.5, 1, 2, 4]",
            "EDITSERVE_WEBHOOKS__MAX_ATTEMPTS": "10", "EDITSERVE_WEBHOOKS__TIMEOUT_SECONDS": "5",
            # one tenant sends everything: the per-tenant admission limits are not under test here
            "EDITSERVE_LIMITS__TENANT_RPS": "1000000", "EDITSERVE_LIMITS__TENANT_BURST": "1000000",
            "EDITSERVE_LIMITS__TENANT_MAX_QUEUED": "1000000", "EDITSERVE_LIMITS__TENANT_MAX_CONCURRENT": "1000000",
        }
        if self.args.retention:
            env.update({name: str(self.args.retention) for name in RETENTION_VARIABLES})
        self.stack = LocalStack(redis_url=self.redis.url, s3=self.s3, models_dir=REPO / ".models", extra_env=env)
        self.stack.start_gateway()
        self.stack.start_webhook_sender()
        for name in self.all_workers():
            self.start_worker(name)
        deadline = time.monotonic() + 180
        for name in self.all_workers():
            while '"event":"worker_started"' not in self.read_log(name):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not start: {self.read_log(name)[-2000:]}")
                time.sleep(0.3)
        import redis

        self.redis_keys["baseline"] = redis.Redis.from_url(self.redis.url).dbsize()
        log(f"stack up: gateway {self.stack.base_url}, {len(self.worker_names)} workers, Redis AOF on port "
            f"{self.redis.port}, logs in {self.stack.log_dir}")

    def read_log(self, name: str) -> str:
        path = self.stack.log(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self.stop_event.set()
        if self.stack is not None:
            try:
                self.stack.stop(timeout=10)
            except Exception as exc:  # noqa: BLE001
                print(f"warning: stopping the stack: {exc}", file=sys.stderr)
        if self.s3_proxy is not None:
            self.s3_proxy.close()
        if self.hook_server is not None:
            self.hook_server.shutdown()
            self.hook_server.server_close()
        if self.s3 is not None:
            self.s3.stop()
            if self.s3.data_dir:
                shutil.rmtree(self.s3.data_dir, ignore_errors=True)
        if self.redis is not None:
            self.redis.stop(signal.SIGKILL)
            shutil.rmtree(self.redis.data_dir, ignore_errors=True)

    # ---------------------------------------------------------------- threads
    def submitter(self) -> None:
        from PIL import Image

        from editserve import Client
        from editserve.errors import APIError

        buf = io.BytesIO()
        Image.new("RGB", (SIZE, SIZE), (200, 120, 40)).save(buf, format="PNG")
        png = buf.getvalue()
        n = self.args.jobs
        interval = self.args.duration * 0.85 / n
        rng = random.Random(self.args.seed + 1)
        with Client(self.stack.base_url, timeout=10, retries=4) as client:
            for i in range(n):
                if self.stop_event.is_set():
                    return
                t_next = time.monotonic() + interval
                webhook = {"url": self.hook_url, "events": ["started", "completed"]} if i % 3 == 0 else None
                roll = rng.random()
                try:
                    if roll < 0.6:
                        edit = client.submit_p2p("a photo of a cat", ["a photo of a dog"] if roll < 0.4
                                                 else ["a photo of a small cat"], edit="replace" if roll < 0.4
                                                 else "refine", steps=STEPS, height=SIZE, width=SIZE, seed=i,
                                                 webhook=webhook)
                        sub = Submitted(edit.id, "p2p", 2, webhook is not None)
                    else:
                        sweep = {"text_guidance": [5.0, 7.5]} if roll > 0.9 else None
                        edit = client.submit_ip2p(png, "make it snowy", steps=STEPS, resolution=SIZE, seed=i,
                                                  sweep=sweep, webhook=webhook)
                        sub = Submitted(edit.id, "ip2p", 2 if sweep else 1, webhook is not None)
                except (APIError, Exception) as exc:  # noqa: BLE001 — refused or unreachable: not accepted
                    with self.state.lock:
                        self.state.rejected[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                    continue
                with self.state.lock:
                    self.state.accepted[sub.id] = sub
                if rng.random() < 0.05:  # a few cancels, queued or running
                    sub.cancel = True
                    try:
                        client.cancel(sub.id)
                    except Exception:  # noqa: BLE001 — e.g. already finished: fine
                        pass
                time.sleep(max(0.0, t_next - time.monotonic()))

    def chaos(self, until: float) -> None:
        lo, hi = self.args.chaos_interval
        redis_sig = [signal.SIGKILL, signal.SIGTERM]
        while time.monotonic() < until and not self.stop_event.is_set():
            if self.stop_event.wait(self.rng.uniform(lo, hi)):
                return
            if time.monotonic() >= until:
                return
            if self.rng.random() < 0.7:
                name = self.rng.choice(self.worker_names)
                with self.procs_lock:  # held until restarted: the supervisor must not start a second one
                    proc = self.stack.processes.get(name)
                    if proc is not None and proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait(10)
                        self.state.actions["worker SIGKILL"] += 1
                        log(f"chaos: SIGKILL {name}")
                    time.sleep(self.rng.uniform(1.0, 3.0))
                    self.start_worker(name)
            else:
                sig = redis_sig[self.state.actions["redis restart"] % 2]
                down = self.rng.uniform(1.0, 2.0)
                log(f"chaos: Redis {signal.Signals(sig).name}, down {down:.1f}s")
                self.redis.restart(sig, down_seconds=down)
                self.state.actions["redis restart"] += 1
                self.state.actions[f"redis {signal.Signals(sig).name}"] += 1

    def supervisor(self) -> None:
        """Restart any stack process that exited on its own (a Redis outage may take one down)."""
        while not self.stop_event.wait(1.0):
            with self.procs_lock:
                for name, proc in list(self.stack.processes.items()):
                    if proc.poll() is None:
                        continue
                    self.state.exits[f"{name.split('-')[0]} exited rc={proc.returncode}"] += 1
                    if name in self.all_workers():
                        self.start_worker(name)
                    elif name == "webhooks":
                        self.stack.start_webhook_sender()
                    elif name == "gateway":
                        self.stack.start_gateway()

    def storage_outage(self, at: float) -> None:
        """The workers' S3 goes away once, for longer than their upload retries (~7.5 s at the defaults)."""
        if self.args.s3_outage <= 0 or self.stop_event.wait(max(0.0, at - time.monotonic())):
            return
        log(f"chaos: workers' S3 down for {self.args.s3_outage:.0f}s")
        self.s3_proxy.down()
        self.state.actions["S3 outage"] += 1
        self.stop_event.wait(self.args.s3_outage)
        self.s3_proxy.up()
        log("chaos: workers' S3 back")

    def event_watcher(self) -> None:
        """Every terminal status published on editserve:events:* (reconnecting across Redis restarts)."""
        import redis

        while not self.stop_event.is_set():
            try:
                conn = redis.Redis.from_url(self.redis.url, socket_connect_timeout=1, socket_timeout=2)
                pubsub = conn.pubsub()
                pubsub.psubscribe("editserve:events:*")
                while not self.stop_event.is_set():
                    message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if not message:
                        continue
                    edit = json.loads(message["data"])
                    if edit.get("status") in TERMINAL:
                        with self.state.lock:
                            self.state.terminal_events[edit["id"]].add((edit["status"], edit.get("revision")))
            except Exception:  # noqa: BLE001 — Redis restarting: reconnect
                time.sleep(0.2)

    # ---------------------------------------------------------------- settle and verify
    def settle(self, deadline: float) -> dict[str, Any]:
        from editserve import Client

        pending = set(self.state.accepted)
        finals: dict[str, Any] = {}
        with Client(self.stack.base_url, timeout=10, retries=4) as client:
            while pending and time.monotonic() < deadline:
                for edit_id in sorted(pending):
                    try:
                        edit = client.get(edit_id)
                    except Exception:  # noqa: BLE001
                        continue
                    if edit.status.value in TERMINAL:
                        finals[edit_id] = edit
                        pending.discard(edit_id)
                if pending:
                    time.sleep(1.0)
            for edit_id in pending:  # last look: still visible (non-terminal) or gone?
                try:
                    finals[edit_id] = client.get(edit_id)
                except Exception as exc:  # noqa: BLE001
                    finals[edit_id] = exc
        return finals

    def wait_webhooks(self, finals: dict[str, Any], deadline: float) -> None:
        want = {i for i, s in self.state.accepted.items()
                if s.webhook and not isinstance(finals.get(i), Exception)
                and getattr(finals.get(i), "status", None) is not None and finals[i].status.value in TERMINAL}
        while time.monotonic() < deadline:
            with self.hooks.lock:
                got = {d for _, t, d, _, ok in self.hooks.received if t == "edit.completed" and ok}
            if want <= got:
                return
            time.sleep(0.5)

    def verify(self, finals: dict[str, Any]) -> dict[str, Any]:
        import redis

        from service.keys import edit_key

        s3 = self.s3.client()
        conn = redis.Redis.from_url(self.redis.url)
        counts = Counter()
        failed_reasons = Counter()
        lost, duplicated, problems = [], [], []
        for edit_id, sub in self.state.accepted.items():
            final = finals.get(edit_id)
            if isinstance(final, Exception) or final is None:
                lost.append(f"{edit_id}: not visible ({final!r})")
                continue
            status = final.status.value
            if status not in TERMINAL:
                lost.append(f"{edit_id}: still {status} after settling (attempts {final.metrics.attempts})")
                continue
            counts[status] += 1
            if status == "failed":
                failed_reasons[f"{final.error.type}: {re.sub(r'[0-9a-z]{26}', '<id>', final.error.message)[:90]}"] += 1
            # results: exactly one attempt's worth, every referenced object present, nothing extra
            keys = {o["Key"] for o in s3.list_objects_v2(Bucket=self.s3.bucket, Prefix=f"edits/{edit_id}/")
                    .get("Contents", [])}
            outputs = {k for k in keys if "/output-" in k}
            if status == "succeeded":
                expected = {f"edits/{edit_id}/output-{i}.png" for i in range(sub.outputs)}
                if len(final.results) != sub.outputs or outputs != expected:
                    duplicated.append(f"{edit_id}: {len(final.results)} results, objects {sorted(outputs)}, "
                                      f"expected {sub.outputs}")
            elif final.results:
                problems.append(f"{edit_id}: {status} but shows {len(final.results)} results")
            elif outputs:
                counts["unreferenced outputs (failed/canceled edits)"] += 1
            events = self.state.terminal_events.get(edit_id, set())
            if len({rev for _, rev in events}) > 1:
                duplicated.append(f"{edit_id}: {len(events)} terminal transitions published: {sorted(events)}")
            if any(s != status for s, _ in events):
                duplicated.append(f"{edit_id}: published terminal {sorted(events)} but now {status}")
            attempts = int(conn.hget(edit_key(edit_id), "attempts") or 0)
            counts[f"attempts={attempts}"] += 1
        # webhooks
        with self.hooks.lock:
            received = list(self.hooks.received)
        unverified = [r for r in received if not r[4]]
        completed: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
        deliveries = Counter()
        for msg_id, typ, edit_id, status, ok in received:
            if ok and typ == "edit.completed":
                completed[edit_id][msg_id].add(status)
                deliveries[(edit_id, msg_id)] += 1
        hook_missing = []
        for edit_id, sub in self.state.accepted.items():
            final = finals.get(edit_id)
            if not sub.webhook or isinstance(final, Exception) or final is None or final.status.value not in TERMINAL:
                continue
            msgs = completed.get(edit_id, {})
            if not msgs:
                hook_missing.append(edit_id)
                continue
            statuses = set().union(*msgs.values())
            if len(msgs) > 1 or statuses != {final.status.value}:
                duplicated.append(f"{edit_id}: completed webhooks {({k: sorted(v) for k, v in msgs.items()})}, "
                                  f"final {final.status.value}")
        redelivered = sum(n - 1 for n in deliveries.values() if n > 1)
        # re-executions (a job run to completion more than once; the JobStore keeps the first outcome)
        runs = Counter()
        for name in self.all_workers():
            for line in self.read_log(name).splitlines():
                start = line.find('{"event":"job"')
                if start >= 0:
                    try:
                        ev = json.loads(line[start:])
                    except ValueError:
                        continue
                    if ev.get("outcome") in ("succeeded", "failed"):
                        runs[ev["edit_id"]] += 1
        rerun = sum(1 for i in self.state.accepted if runs[i] > 1)
        # edits the server holds that the client never got an id for (a response lost in an outage)
        orphans = []
        hostile_ids = set(self.hostile.accepted_ids) if self.hostile else set()
        hostile_states = Counter((conn.hget(edit_key(i), "status") or b"missing").decode() for i in hostile_ids)
        for key in conn.scan_iter("editserve:edit:*"):
            edit_id = key.decode().rsplit(":", 1)[1]
            if edit_id not in self.state.accepted and edit_id not in hostile_ids:
                status = (conn.hget(key, "status") or b"?").decode()
                orphans.append((edit_id, status))
        return {"counts": counts, "failed_reasons": failed_reasons, "lost": lost, "duplicated": duplicated,
                "problems": problems, "webhooks_received": len(received), "webhooks_verified": len(received) - len(unverified),
                "webhooks_unverified": len(unverified), "webhook_completed_missing": hook_missing,
                "webhook_redeliveries": redelivered, "reexecuted": rerun, "orphans": orphans,
                "hostile_states": hostile_states}

    # ---------------------------------------------------------------- main
    def run(self) -> tuple[str, bool]:
        args = self.args
        t_start = time.monotonic()
        hard_end = t_start + args.max_seconds
        self.start()
        from hostile import HealthProbe, HostileClient

        chaos_end = time.monotonic() + args.duration
        self.probe = HealthProbe(self.stack.base_url).start()
        if args.hostile_rounds > 0:
            self.hostile = HostileClient(self.stack.base_url, max_image_pixels=self.max_image_pixels(),
                                         rounds=args.hostile_rounds, pause=args.duration / (args.hostile_rounds + 1))
            self.hostile.start()
        threads = [threading.Thread(target=self.submitter, name="submitter", daemon=True),
                   threading.Thread(target=self.chaos, args=(chaos_end,), name="chaos", daemon=True),
                   threading.Thread(target=self.storage_outage, args=(time.monotonic() + args.duration * 0.4,),
                                    name="s3-outage", daemon=True),
                   threading.Thread(target=self.supervisor, name="supervisor", daemon=True),
                   threading.Thread(target=self.event_watcher, name="events", daemon=True)]
        for t in threads:
            t.start()
        threads[0].join(max(1.0, min(args.duration + 60, hard_end - time.monotonic() - 60)))
        threads[1].join(max(0.0, chaos_end - time.monotonic() + 15))
        if self.hostile is not None:
            self.hostile.stop()
        self.probe.stop()
        gateway = self.stack.processes.get("gateway")
        from hostile import peak_rss_mb

        self.gateway_peak_mb = peak_rss_mb(gateway.pid) if gateway is not None else None
        log(f"chaos over: {dict(self.state.actions)}; {len(self.state.accepted)} accepted; settling ...")
        settle_end = min(time.monotonic() + args.settle, hard_end - 30)
        finals = self.settle(settle_end)
        self.wait_webhooks(finals, min(time.monotonic() + 45, hard_end - 15))
        time.sleep(1.0)
        import redis

        self.redis_keys["after settling"] = redis.Redis.from_url(self.redis.url).dbsize()
        result = self.verify(finals)
        if args.retention:
            self.age_out(redis.Redis.from_url(self.redis.url), args.retention)
        self.stop_event.set()
        elapsed = time.monotonic() - t_start
        text = self.render(result, elapsed)
        ok = not result["lost"] and not result["duplicated"]
        return text, ok

    def age_out(self, conn, retention: int) -> None:
        """Wait past the retention TTLs, driving the reaper's pass (and its retention sweep) every second,
        until the key count stops falling; records the count and what is left beyond the baseline."""
        from service.config import Settings
        from worker.runtime.reaper import Reaper

        settings = Settings(redis_url=self.redis.url, **{"retention": {"record_ttl_seconds": retention,
                            "idempotency_ttl_seconds": retention, "stats_ttl_seconds": retention},
                            "worker": {"result_ttl_seconds": retention}, "webhooks": {"state_ttl_seconds": retention}})
        reaper = Reaper(conn, settings)
        log(f"aging out: retention {retention} s ...")
        end = time.monotonic() + retention + 60
        while time.monotonic() < end and conn.dbsize() > self.redis_keys["baseline"]:
            reaper.run_once()
            time.sleep(1.0)
        self.redis_keys["after aging out"] = conn.dbsize()
        self.redis_keys_left = sorted(k.decode() for k in conn.keys("*"))

    @staticmethod
    def max_image_pixels() -> int:
        from service.config import Settings

        return Settings().limits.max_image_pixels

    @staticmethod
    def gateway_memory_bound_mb() -> float:
        """README's stated worst case: the idle gateway plus ``max_concurrent_decodes`` decodes at the pixel limit."""
        from service.config import Settings

        limits = Settings().limits
        per_decode_mb = limits.max_image_pixels * DECODE_BYTES_PER_PIXEL / 2**20
        return GATEWAY_IDLE_MB + limits.max_concurrent_decodes * per_decode_mb

    def hostile_lines(self, r: dict[str, Any]) -> list[str]:
        lines = [f"  health probe (attack)    {self.probe.summary() if self.probe else 'off'}  (goal p99 < 100 ms)"]
        if self.probe and self.hostile:
            lines.append(f"                           {self.probe.split_by(self.hostile.bursts)}")
        peak, bound = self.gateway_peak_mb, self.gateway_memory_bound_mb()
        lines.append(f"  gateway peak RSS         {peak:.0f} MB; stated bound {bound:.0f} MB: "
                     f"{'held' if peak <= bound else 'EXCEEDED'}" if peak else "  gateway peak RSS         ?")
        keys = self.redis_keys
        if "after aging out" in keys:
            lines.append(f"  Redis keys               baseline {keys.get('baseline')}, after settling "
                         f"{keys.get('after settling')}, after aging out {keys['after aging out']} "
                         f"(retention {self.args.retention} s; goal: baseline plus the bounded rq:queues registry)")
            lines.append(f"    keys left: {', '.join(getattr(self, 'redis_keys_left', []))}")
        else:
            lines.append(f"  Redis keys               baseline {keys.get('baseline')}, after settling "
                         f"{keys.get('after settling')} (retention TTLs are days: --retention N ages out)")
        if self.hostile is not None:
            lines.append(f"  attacker answers (5xx other than 503: {self.hostile.five_xx()}); its accepted "
                         f"large-picture edits: {dict(r['hostile_states'])}")
            lines += self.hostile.lines()
        return lines

    def render(self, r: dict[str, Any], elapsed: float) -> str:
        s, a = self.state, self.args
        c = r["counts"]
        attempts = {k: v for k, v in sorted(c.items()) if k.startswith("attempts=")}
        lines = [
            f"editserve chaos run — {machine_slug()}, {time.strftime('%Y-%m-%d %H:%M')}, {elapsed:.0f}s, seed {a.seed}",
            f"stack: gateway + webhook sender + {a.workers} workers (tiny-sd,tiny-ip2p; heartbeat TTL 5s, reaper 1s, "
            f"max_retries {a.max_retries}); Redis AOF appendfsync always; {SIZE}px, {STEPS} steps; "
            f"workers' S3 down {a.s3_outage:.0f}s once; one more worker with {a.long_step:.0f}s steps; "
            f"{a.hostile_rounds} attacker rounds",
            f"chaos over {a.duration:.0f}s: {dict(s.actions)}; processes that exited on their own "
            f"(restarted): {dict(s.exits) or 'none'}",
            "",
            f"  submitted                {a.jobs}",
            f"  accepted (202)           {len(s.accepted)}",
            f"  refused/unreachable      {sum(s.rejected.values())}  {dict(s.rejected) if s.rejected else ''}",
            f"  succeeded                {c['succeeded']}",
            f"  failed                   {c['failed']}",
        ]
        for reason, n in r["failed_reasons"].most_common():
            lines.append(f"      {n:>4} × {reason}")
        lines += [
            f"  canceled                 {c['canceled']}  (cancel requested for "
            f"{sum(1 for x in s.accepted.values() if x.cancel)})",
            f"  LOST                     {len(r['lost'])}",
            f"  DUPLICATED               {len(r['duplicated'])}",
            f"  attempts per edit        {attempts}",
            f"  re-executed to the end   {r['reexecuted']} (ran twice; the JobStore kept one outcome)",
            f"  unreferenced outputs     {c['unreferenced outputs (failed/canceled edits)']} failed/canceled edits "
            f"with output objects left in S3 (never shown)",
            f"  other problems           {len(r['problems'])}",
            f"  orphans                  {len(r['orphans'])} edits the server holds whose POST response the "
            f"client never got: {Counter(st for _, st in r['orphans']) or ''}",
            f"  webhooks received        {r['webhooks_received']}, signature verified {r['webhooks_verified']}, "
            f"unverified {r['webhooks_unverified']}, same-id redeliveries {r['webhook_redeliveries']}",
            f"  completed webhook missing {len(r['webhook_completed_missing'])} of "
            f"{sum(1 for x in s.accepted.values() if x.webhook)} edits with webhooks",
            *self.hostile_lines(r),
        ]
        for title, items in (("lost", r["lost"]), ("duplicated", r["duplicated"]), ("problems", r["problems"]),
                             ("completed webhook missing", r["webhook_completed_missing"])):
            for item in items[:15]:
                lines.append(f"    {title}: {item}")
        lines.append("")
        lines.append("verdict: " + ("OK (0 lost, 0 duplicated)" if not r["lost"] and not r["duplicated"]
                                    else "FAILED"))
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chaos = Chaos(args)
    timer = threading.Timer(args.max_seconds + 20, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    with signals_interrupt():
        timer.start()
        try:
            text, ok = chaos.run()
        finally:
            timer.cancel()
            chaos.close()
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"chaos-{args.machine or machine_slug()}.txt"
    path.write_text(text + "\n")
    print(f"written: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
