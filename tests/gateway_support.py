"""Helpers shared by the gateway, jobstore and storage tests (imported, not a conftest: the lead owns that)."""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
import redis

from editserve.contract import BatchKey, JobPayload, P2PEditRequest
from service.config import S3Settings, Settings
from devtools.devstack import free_port, wait_for_port

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def s3_settings(s3_server, **overrides) -> S3Settings:
    values = dict(endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key,
                  secret_access_key=s3_server.secret_key, bucket=s3_server.bucket, region=s3_server.region)
    values.update(overrides)
    return S3Settings(**values)


def make_settings(redis_url: str, s3_server=None, **overrides) -> Settings:
    values: dict = dict(redis_url=redis_url)
    if s3_server is not None:
        values["s3"] = s3_settings(s3_server)
    values.update(overrides)
    return Settings(**values)


def p2p_payload(edit_id: str, tenant: str = "default", *, steps: int = 10, priority: str = "normal",
                source: str = "a cat on a mat", target: str = "a dog on a mat", model: str = "tiny-sd") -> JobPayload:
    request = P2PEditRequest(source_prompt=source, target_prompts=[target], model=model, steps=steps,
                             scheduler="ddim", height=128, width=128, priority=priority)
    key = BatchKey(model=model, kind="p2p", height=128, width=128, steps=steps, scheduler="ddim")
    return JobPayload(id=edit_id, tenant=tenant, request=request, batch_key=key, seeds=[7],
                      created_at=datetime.now(UTC))


def png(width: int = 96, height: int = 64, color=(200, 30, 30), fmt: str = "PNG", mode: str = "RGB", **save) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def edit_queue_lengths(connection: redis.Redis) -> int:
    """Jobs sitting in any edit queue (what a worker could pick up)."""
    return sum(connection.llen(k) for k in connection.scan_iter("rq:queue:edits.*"))


def edit_records(connection: redis.Redis) -> int:
    return sum(1 for _ in connection.scan_iter("editserve:edit:*"))


@dataclass
class LiveServer:
    """A real uvicorn serving the app over HTTP on a free loopback port (in a thread)."""

    url: str
    app: object
    server: object
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_live_server(app) -> LiveServer:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=20)
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return LiveServer(url=f"http://127.0.0.1:{port}", app=app, server=server, thread=thread)


@pytest.fixture
def gateway_settings(redis_url, s3) -> Settings:
    return make_settings(redis_url, s3, auth={"admin_token": "admin-secret-token"})


@pytest.fixture
def gateway_app(gateway_settings):
    from service.app import create_app

    app = create_app(gateway_settings, prepare_bucket=False)
    app.state.services.sse_keepalive_seconds = 0.3
    return app


@pytest.fixture
def live(gateway_app):
    server = start_live_server(gateway_app)
    yield server
    server.stop()


@pytest.fixture
def store(gateway_app):
    return gateway_app.state.services.jobstore


@pytest.fixture
def rconn(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def conn(redis_url):
    """A sync client on the test's Redis database (JobStore tests read keys directly)."""
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def js(conn, redis_url):
    """The JobStore the gateway builds, on the test's Redis."""
    from service.jobstore import JobStore

    return JobStore(conn, make_settings(redis_url))
