"""Every Redis key a workload writes expires or is swept: after a mixed workload ages out, Redis is back at
its baseline key count (issue 9, item 8).

Real processes (uvicorn gateway, RQ worker on tiny random-weight models, webhook sender), real Redis and
S3, retention shortened to seconds by environment. Aging is driven: the test sleeps past the TTLs once,
then runs the reaper's pass (which carries the retention sweep) instead of waiting for its interval.

Baseline: the idle stack after one warm-up edit has aged out. Why a warm-up: RQ's queue registry
``rq:queues`` is created by the first enqueue and kept (it is bounded: three priorities per model plus the
webhook queue), so an empty Redis is not a state a serving deployment returns to. The warm-up touches
every queue the workload does.
"""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from PIL import Image

from devtools.devstack import LocalStack, free_port
from editserve import Client, EditStatus
from service.config import Settings
from service.storage import input_key
from worker.runtime.reaper import Reaper

pytestmark = pytest.mark.e2e
RETENTION_REDIS_DB = 11
TTL = 5  # seconds: records, RQ results, idempotency claims, ETA stats, webhook state
SIZE, STEPS = 64, 4
RETENTION_ENV = {
    "EDITSERVE_RETENTION__RECORD_TTL_SECONDS": str(TTL),
    "EDITSERVE_RETENTION__IDEMPOTENCY_TTL_SECONDS": str(TTL),
    "EDITSERVE_RETENTION__STATS_TTL_SECONDS": str(TTL),
    "EDITSERVE_WORKER__RESULT_TTL_SECONDS": str(TTL),
    "EDITSERVE_WEBHOOKS__STATE_TTL_SECONDS": str(TTL),
    "EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]',
    "EDITSERVE_WEBHOOKS__BACKOFF_SECONDS": "[0.2, 0.2]",
    "EDITSERVE_WEBHOOKS__MAX_ATTEMPTS": "2",
    "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "100",
    "EDITSERVE_WORKER__DEBUG_STEP_DELAY_SECONDS": "0.25",  # room to cancel a running edit
}


class Hooks(BaseHTTPRequestHandler):
    """Accepts /ok deliveries, refuses /fail ones (they end in the failed-deliveries stream)."""

    received: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.received.append(self.path)
        self.send_response(200 if self.path == "/ok" else 500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stack(redis_server, s3_server, tiny_models):
    url = redis_server.url.rsplit("/", 1)[0] + f"/{RETENTION_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    hooks = ThreadingHTTPServer(("127.0.0.1", port), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    s = LocalStack(redis_url=url, s3=s3_server, models_dir=tiny_models["tiny-sd"].parent, extra_env=RETENTION_ENV)
    s.start_gateway()
    s.start_webhook_sender()
    s.start_worker("keeper")
    s.hooks = f"http://127.0.0.1:{port}"
    s.redis = redis.Redis.from_url(url)
    s.settings = Settings(redis_url=url, retention={"record_ttl_seconds": TTL, "idempotency_ttl_seconds": TTL,
                                                    "stats_ttl_seconds": TTL},
                          worker={"result_ttl_seconds": TTL}, webhooks={"state_ttl_seconds": TTL})
    yield s
    s.stop()
    hooks.shutdown()


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f": {what()}" if callable(what) else ""))


def _p2p(client, seed, *, steps=STEPS, **kw):
    return client.submit_p2p("a photo of a cat", ["a photo of a dog"], edit="replace", steps=steps,
                             height=SIZE, width=SIZE, seed=seed, **kw)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (90, 140, 200)).save(buf, format="PNG")
    return buf.getvalue()


SIZE_OF = {b"zset": "zcard", b"set": "scard", b"list": "llen", b"hash": "hlen", b"stream": "xlen"}


def _snapshot(conn: redis.Redis) -> dict[bytes, int]:
    """Every key with its size (members, fields, entries; 1 for a string): a set that keeps growing under
    one name leaks as surely as a new key."""
    sizes = {}
    for key in conn.keys("*"):
        size_of = SIZE_OF.get(conn.type(key))
        sizes[key] = getattr(conn, size_of)(key) if size_of else 1
    return sizes


def _leftover(conn: redis.Redis, baseline: dict[bytes, int], now: dict[bytes, int]) -> set[bytes]:
    """Keys the baseline lacks, and keys without a TTL that grew (a live process's own keys, e.g. an RQ
    worker's hash, change size but expire unless their process renews them)."""
    return {k for k, size in now.items()
            if k not in baseline or (size > baseline[k] and conn.ttl(k) == -1)}


def _describe(conn: redis.Redis, keys) -> list[str]:
    sizes = _snapshot(conn)
    return sorted(f"{k.decode()} ({conn.type(k).decode()}, size {sizes.get(k)}, ttl {conn.ttl(k)})" for k in keys)


def _age_out(stack, baseline: dict[bytes, int], timeout: float = 60.0) -> int:
    """Past every TTL, then reaper passes (with their retention sweep) until Redis is back to ``baseline``."""
    time.sleep(TTL + 1)
    reaper = Reaper(stack.redis, stack.settings)
    leftover: set[bytes] = set()
    now: dict[bytes, int] = {}

    def back_to_baseline() -> bool:  # one snapshot: a live worker's reaper lock may come and go between two
        nonlocal leftover, now
        reaper.run_once()
        now = _snapshot(stack.redis)
        leftover = _leftover(stack.redis, baseline, now)
        return not leftover

    deadline = time.monotonic() + timeout
    while not back_to_baseline():
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(leftover)} keys never expired nor were swept: "
                                 f"{_describe(stack.redis, leftover)}")
        time.sleep(0.5)
    return len(now)


TERMINAL = (EditStatus.succeeded, EditStatus.failed, EditStatus.canceled)


def _settle(client, edits, final: dict) -> bool:
    """Poll the edits not yet seen terminal, remembering each final status (records soon expire: TTL)."""
    for e in edits:
        if e.id not in final and (status := client.get(e.id).status) in TERMINAL:
            final[e.id] = status
    return len(final) == len(edits)


def test_mixed_workload_ages_out_to_the_baseline_key_count(stack, s3_server):
    conn = stack.redis
    with Client(stack.base_url, timeout=30) as client:
        warm = [_p2p(client, 1, webhook=f"{stack.hooks}/ok"),
                client.submit_ip2p(_png(), "make it red", steps=STEPS, resolution=SIZE, seed=1)]
        warm_final: dict[str, EditStatus] = {}
        _wait(lambda: _settle(client, warm, warm_final), 180, lambda: f"warm-up edits, got {warm_final}")
        assert set(warm_final.values()) == {EditStatus.succeeded}
        _wait(lambda: "/ok" in Hooks.received, 30, "warm-up webhook")
        time.sleep(TTL + 1)
        reaper = Reaper(conn, stack.settings)
        for _ in range(5):
            reaper.run_once()
            time.sleep(0.3)
        baseline = _snapshot(conn)
        workload_keys = (b"editserve:edit:", b"editserve:tenant:default:edits", b"editserve:idem:", b"rq:job:")
        assert not [k for k in baseline if k.startswith(workload_keys)], _describe(conn, baseline)

        # ---- the workload: succeeded (with webhooks, one receiver refusing), idempotent replays, a failed
        # edit, one canceled while queued and one while running
        ok = [_p2p(client, seed, webhook=f"{stack.hooks}/ok") for seed in (2, 3)]
        refused = _p2p(client, 4, webhook=f"{stack.hooks}/fail")
        first = _p2p(client, 5, idempotency_key="replay-me")
        again = _p2p(client, 5, idempotency_key="replay-me")
        assert again.id == first.id
        running = _p2p(client, 6, steps=40)
        _wait(lambda: (client.get(running.id).progress or 0) and client.get(running.id).progress.step >= 1,
              180, "the long edit running")
        queued = _p2p(client, 7, steps=40)
        bad = client.submit_ip2p(_png(), "make it blue", steps=STEPS, resolution=SIZE, seed=8)
        s3_server.client().put_object(Bucket=s3_server.bucket, Key=input_key(bad.id), Body=b"not an image")
        assert client.cancel(queued.id).status == EditStatus.canceled
        client.cancel(running.id)
        edits = [*ok, refused, first, running, queued, bad]
        final: dict[str, EditStatus] = {}
        _wait(lambda: _settle(client, edits, final), 300, lambda: f"edits terminal, got {final}")
        assert final[bad.id] == EditStatus.failed and final[running.id] == EditStatus.canceled
        assert {final[e.id] for e in (*ok, refused, first)} == {EditStatus.succeeded}
        _wait(lambda: Hooks.received.count("/fail") >= 2 and Hooks.received.count("/ok") >= 3, 60,
              lambda: f"webhook deliveries, got {Hooks.received}")
        peak = len(conn.keys("*"))
        assert len(_leftover(conn, baseline, _snapshot(conn))) > 10  # the workload did write keys

    aged = _age_out(stack, baseline)
    assert aged <= len(baseline)
    print(f"redis keys: baseline {len(baseline)}, after the workload {peak}, aged out {aged}")
