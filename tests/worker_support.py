"""Shared helpers of the worker tests: settings for the test Redis/S3, payloads, subprocess workers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis
from PIL import Image

from editserve.contract import BatchKey, IP2PEditRequest, JobPayload, P2PEditRequest, Sweep
from service.config import S3Settings, Settings, WorkerSettings
from service.jobstore import JobStore, new_edit_id
from service.keys import edit_key
from service.storage import Storage, input_key

REPO = Path(__file__).resolve().parent.parent
SIZE = 64
STEPS = 4
TENANT = "tests"


def make_settings(redis_url: str, s3_server, **worker: object) -> Settings:
    s3 = S3Settings(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                    secret_access_key=s3_server.secret_key, bucket=s3_server.bucket, region=s3_server.region)
    defaults: dict[str, object] = {"metrics_port": 0, "max_batch_wait_ms": 100, "max_batch_size": 8}
    return Settings(redis_url=redis_url, s3=s3, worker=WorkerSettings(**{**defaults, **worker}))


def p2p_payload(*, steps: int = STEPS, size: int = SIZE, seed: int = 7, priority: str = "normal",
                **request: object) -> JobPayload:
    request = {"source_prompt": "a photo of a cat", "target_prompts": ["a photo of a dog"], **request}
    req = P2PEditRequest(steps=steps, height=size, width=size, priority=priority, **request)
    key = BatchKey(model="tiny-sd", kind="p2p", height=size, width=size, steps=steps, scheduler="ddim")
    return JobPayload(id=new_edit_id(), tenant=TENANT, request=req, batch_key=key, seeds=[seed],
                      created_at=datetime.now(UTC))


def ip2p_payload(storage: Storage, *, steps: int = STEPS, size: int = SIZE, sweep: Sweep | None = None,
                 seeds: list[int] | None = None, instruction: str = "make it snowy") -> JobPayload:
    req = IP2PEditRequest(instruction=instruction, steps=steps, resolution=size, sweep=sweep)
    key = BatchKey(model="tiny-ip2p", kind="ip2p", height=size, width=size, steps=steps, scheduler="euler_a")
    edit_id = new_edit_id()
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 40)).save(buf, format="PNG")
    storage.put_bytes(input_key(edit_id), buf.getvalue(), "image/png")
    return JobPayload(id=edit_id, tenant=TENANT, request=req, batch_key=key, seeds=seeds or [11],
                      input_image_key=input_key(edit_id), created_at=datetime.now(UTC))


def submit(store: JobStore, payload: JobPayload) -> str:
    store.create(payload, webhook=None, idempotency_key=None)
    return payload.id


def edit_field(connection: redis.Redis, edit_id: str, name: str) -> str | None:
    raw = connection.hget(edit_key(edit_id), name)
    return raw.decode() if raw is not None else None


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str | Callable[[], str] = "condition"):
    """Poll ``predicate``; ``what`` (a string, or a callable evaluated on timeout) explains a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def started_entries(connection: redis.Redis) -> list[bytes]:
    return [m for key in connection.scan_iter("rq:wip:*") for m in connection.zrange(key, 0, -1)]


def intermediate_entries(connection: redis.Redis) -> list[bytes]:
    return [m for key in connection.scan_iter("rq:queue:*:intermediate") for m in connection.lrange(key, 0, -1)]


class EventCounter:
    """Every status published on ``editserve:events:*`` (one message per status change), from subscription on."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn  # held: a collected client closes its pool, and the subscription with it
        self.pubsub = conn.pubsub()
        self.pubsub.psubscribe("editserve:events:*")
        self.pubsub.get_message(timeout=1)  # the subscribe confirmation: listening from here on
        self.seen: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message:
                edit = json.loads(message["data"])
                self.seen.append((edit["id"], edit["status"]))

    def count(self, edit_id: str, status: str) -> int:
        return self.seen.count((edit_id, status))

    def of(self, edit_id: str) -> list[str]:
        """The edit's terminal statuses in order: exactly one for an edit that ran once."""
        return [status for i, status in self.seen if i == edit_id and status in ("succeeded", "failed", "canceled")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.pubsub.close()


class WorkerProcess:
    """``python -m worker.runtime.worker`` as a child process, configured by environment variables."""

    def __init__(self, settings: Settings, s3_server, name: str, models: str = "tiny-sd", **worker_env: object):
        env = dict(os.environ, **s3_server.env())
        env["EDITSERVE_REDIS_URL"] = settings.redis_url
        env["EDITSERVE_WORKER__METRICS_PORT"] = "0"
        env["PYTHONUNBUFFERED"] = "1"
        env["EDITSERVE_WORKER__TORCH_THREADS"] = "1"
        for key, value in worker_env.items():
            env[f"EDITSERVE_WORKER__{key.upper()}"] = str(value)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"editserve-worker-{name}-{os.getpid()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.runtime.worker", "--models", models,
                                      "--name", name], cwd=REPO, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)
