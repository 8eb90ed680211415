"""Gunicorn settings for the gateway: several uvicorn worker processes with correct Prometheus metrics.

Why gunicorn: prometheus_client's multiprocess mode needs `mark_process_dead` when a worker process
exits, and plain `uvicorn --workers` offers no such hook.
"""

import os
import shutil

bind = os.environ.get("EDITSERVE_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("EDITSERVE_GATEWAY_PROCESSES", "2"))
worker_class = "service.gunicorn_worker.GatewayWorker"  # uvicorn with read deadlines (slowloris)
graceful_timeout = 30
timeout = 120  # `Prefer: wait` and SSE hold requests open
keepalive = 5
accesslog = "-"


def on_starting(server):
    """Wipe stale per-process metric files from a previous run (the docs require a clean directory)."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
