"""Shared fixtures: tiny models built locally, a real Redis, a real S3 HTTP endpoint (SeaweedFS)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("EDITSERVE_MODELS_DIR", REPO / ".models"))
os.environ.setdefault("EDITSERVE_MODELS_DIR", str(MODELS_DIR))
TEST_REDIS_URL = os.environ.get("EDITSERVE_TEST_REDIS_URL")  # unset: a private redis-server per session
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])  # scripts/test.sh runs two (gw0, gw1)
# One BLAS/OpenMP thread in the test process, set before any test module imports torch. Measured on this 2-core box
# while it was shared (load ~14): with MKL_NUM_THREADS unset (or 2) a scheduler test took 15-25 CPU-seconds and
# 70-190 s, with MKL_NUM_THREADS=1 0.7-0.9 CPU-seconds and ~3-7 s, even beside OMP_NUM_THREADS=2 (MKL's threads
# spin). The tiny models gain nothing from a second thread. Subprocess workers inherit both.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """Both tiny random-weight models (built once into .models/, ~5 s), loaded via from_pretrained."""
    from worker.models.builders import ensure_tiny_models

    return ensure_tiny_models(MODELS_DIR)


@pytest.fixture(scope="session")
def redis_server():
    """A real Redis for this test session alone (a private redis-server on a free port).

    Why private: tests flush databases and start workers that consume every edit queue; two test
    sessions sharing one Redis would steal each other's jobs.
    """
    from devtools.devstack import ensure_redis, free_port

    url = _own_database(TEST_REDIS_URL) if TEST_REDIS_URL else f"redis://127.0.0.1:{free_port()}/15"
    server = ensure_redis(url)
    yield server
    server.stop()


def _own_database(url: str) -> str:
    """A shared Redis given by URL: each pytest-xdist worker takes the database below the previous one's (15, 14,
    …), so their flushes and queue-consuming workers never meet. A URL without a database means 15, the tests'."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    database = int(parsed.path.lstrip("/") or 15) - XDIST_WORKER
    if database < 0:
        raise RuntimeError(f"EDITSERVE_TEST_REDIS_URL={url}: no database left for xdist worker {XDIST_WORKER}")
    return parsed._replace(path=f"/{database}").geturl()


@pytest.fixture
def redis_url(redis_server) -> str:
    """A Redis database emptied before each test (db 15 by default: never the demo's db 0)."""
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture(scope="session")
def s3_server():
    from devtools.devstack import start_seaweedfs

    server = start_seaweedfs(bucket="editserve-test")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server):
    """The S3 endpoint with a fresh key prefix per test (the bucket is shared within the session)."""
    s3_server.test_prefix = f"t-{uuid.uuid4().hex[:8]}/"
    return s3_server


@pytest.fixture(scope="module")
def sd_model(tiny_models):
    """tiny-sd loaded through the registry, once per test module (samplers restore what they patch)."""
    from service.config import Settings
    from worker.models.registry import ModelRegistry

    return ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent)).get("tiny-sd")


@pytest.fixture(scope="module")
def runner(sd_model, request):
    """A BatchRunner at the module's SIZE/STEPS (DDIM), the batch-key of the P2P core tests."""
    from worker.editing.batch import BatchRunner

    size, steps = request.module.SIZE, request.module.STEPS
    return BatchRunner(sd_model, height=size, width=size, steps=steps, scheduler="ddim")


@pytest.fixture(scope="module")
def worker_registry(tiny_models):
    """Both tiny models, loaded once per module for in-process workers; one torch thread (2 shared cores)."""
    import torch

    from service.config import Settings
    from worker.models.registry import ModelRegistry

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reg = ModelRegistry(Settings(models_dir=tiny_models["tiny-sd"].parent))
    reg.get("tiny-sd")
    reg.get("tiny-ip2p")
    yield reg
    torch.set_num_threads(threads)


@pytest.fixture
def make_worker(redis_url, s3_server, worker_registry):
    """``make_worker(**worker_settings)``: an in-process EditWorker (registered with RQ) on the test Redis/S3."""
    from worker_support import make_settings

    from worker.runtime.worker import EditWorker

    made = []

    def make(**worker_settings):
        settings = make_settings(redis_url, s3_server, **worker_settings)
        worker = EditWorker(settings, ["tiny-sd", "tiny-ip2p"], f"inproc-{len(made)}", registry=worker_registry)
        worker.bridge.register()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.stop_metrics_server()
        worker.finisher.close()
        worker.bridge.unregister()
