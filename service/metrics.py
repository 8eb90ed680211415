"""Every Prometheus metric of editserve, defined once (gateway, GPU worker and webhook sender import this).

Why one module: names, labels and buckets must match the Grafana dashboards exactly, and a metric
defined twice in one process raises at import. Multiprocess mode (gunicorn with several workers) works
when ``PROMETHEUS_MULTIPROC_DIR`` is set *before* start: every process writes its own files and
``render()`` aggregates them with a fresh registry per scrape (prometheus_client's multiprocess mode).

Labels never carry ids; ``route`` is the route template (``/v1/edits/{edit_id}``), never the raw path.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from service.keys import GLOBAL_QUEUED_KEY
from service.liveness import live_workers
from service.queues import discover, parse_queue_name, rq_queue_key

log = logging.getLogger(__name__)

PREFIX = "editserve_"
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)

http_requests_total = Counter(
    PREFIX + "http_requests", "HTTP requests served", ["route", "method", "code"])
http_request_duration_seconds = Histogram(
    PREFIX + "http_request_duration_seconds", "HTTP request latency", ["route", "method"],
    buckets=SECONDS_BUCKETS)
jobs_submitted_total = Counter(
    PREFIX + "jobs_submitted", "Edits accepted and queued", ["kind", "model"])
jobs_completed_total = Counter(
    PREFIX + "jobs_completed", "Edits that reached a terminal status", ["model", "kind", "status"])
inversion_jobs_total = Counter(
    PREFIX + "inversion_jobs", "Inversion jobs a worker started running (P2P edits from an inversion run none)",
    ["model"])
queue_wait_seconds = Histogram(
    PREFIX + "queue_wait_seconds", "Time from enqueue to the start of processing", ["model", "kind"],
    buckets=SECONDS_BUCKETS)
job_duration_seconds = Histogram(
    PREFIX + "job_duration_seconds", "Processing time of one edit (its whole batch run)", ["model", "kind"],
    buckets=SECONDS_BUCKETS)
batch_size = Histogram(
    PREFIX + "batch_size", "Edits per GPU batch", ["model"], buckets=BATCH_SIZE_BUCKETS)
denoise_step_seconds = Histogram(
    PREFIX + "denoise_step_seconds", "Wall time of one batched denoising step", buckets=STEP_SECONDS_BUCKETS)
running_rows = Histogram(
    PREFIX + "running_rows", "UNet rows of one step of a running batch (step batching)", ["model"],
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128))
admissions_per_step = Histogram(
    PREFIX + "admissions_per_step", "Edits admitted into a running batch before one step (step batching)",
    ["model"], buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16))
first_step_seconds = Histogram(
    PREFIX + "first_step_seconds", "Time from enqueue to the end of an edit's first denoising step",
    ["model", "kind"], buckets=SECONDS_BUCKETS)
webhook_deliveries_total = Counter(
    PREFIX + "webhook_deliveries", "Webhook delivery attempts by outcome", ["outcome"])
rejections_total = Counter(
    PREFIX + "rejections", "Requests refused by a limit (rate_limited, tenant_queue_full, queue_full)", ["reason"])
jobs_in_progress = Gauge(
    PREFIX + "jobs_in_progress", "Edits being processed right now", multiprocess_mode="livesum")
s3_operations_total = Counter(
    PREFIX + "s3_operations", "S3 calls (each attempt) by operation and outcome (ok, error)", ["operation", "outcome"])

QUEUE_DEPTH_NAME = PREFIX + "queue_depth"
QUEUED_EDITS_NAME = PREFIX + "queued_edits"
RUNNING_EDITS_NAME = PREFIX + "running_edits"
LIVE_WORKERS_NAME = PREFIX + "live_workers"
COLLECTED_NAMES = (QUEUE_DEPTH_NAME, QUEUED_EDITS_NAME, RUNNING_EDITS_NAME, LIVE_WORKERS_NAME)
"""Read from Redis at scrape time by the gateway (every gateway reports the same values: aggregate with max)."""


def queue_labels(queue: str) -> tuple[str, str] | None:
    """(model, priority) of an edit queue, None for other queues. Labels stay bounded by models x priorities
    however many batch keys (sizes, steps, schedulers) the queue names carry."""
    parsed = parse_queue_name(queue)
    return None if parsed is None else (parsed[1], parsed[0])


class QueueDepthCollector:
    """Read from Redis at scrape time: ``editserve_queue_depth{model,priority}`` (jobs waiting in RQ lists,
    not running ones), ``editserve_running_edits{model}`` (RQ's started registries: claimed and not settled),
    ``editserve_live_workers{model}`` (service.liveness) and ``editserve_queued_edits`` (every queued edit,
    those held back for fair share included).

    A collector, not a Gauge: the value lives in Redis, not in any process, so it must not be summed
    across gunicorn workers.
    """

    def __init__(self, connection):
        self.connection = connection

    def collect(self):
        family = GaugeMetricFamily(QUEUE_DEPTH_NAME, "Jobs waiting in the edit queues of a model and priority",
                                   labels=["model", "priority"])
        running = GaugeMetricFamily(RUNNING_EDITS_NAME, "Edits of a model a worker has claimed and not settled",
                                    labels=["model"])
        live = GaugeMetricFamily(LIVE_WORKERS_NAME, "Workers with the model loaded whose heartbeat is current",
                                 labels=["model"])
        queued = GaugeMetricFamily(QUEUED_EDITS_NAME, "Edits waiting to start, held ones (fair share) included; "
                                   "limits.max_queue_depth caps it")
        try:
            depth: dict[tuple[str, str], int] = {}
            started: dict[str, int] = {}
            for group in discover(self.connection):
                for name in group.queue_names:
                    labels = queue_labels(name)
                    if labels is None:
                        continue
                    depth[labels] = depth.get(labels, 0) + self.connection.llen(rq_queue_key(name))
                    started[labels[0]] = started.get(labels[0], 0) + self.connection.zcard(f"rq:wip:{name}")
            workers = live_workers(self.connection)
            for (model, priority), n in sorted(depth.items()):
                family.add_metric([model, priority], float(n))
            for model in sorted(set(started) | set(workers)):  # a model with queues and no worker reports 0
                running.add_metric([model], float(started.get(model, 0)))
                live.add_metric([model], float(workers.get(model, 0)))
            queued.add_metric([], float(self.connection.scard(GLOBAL_QUEUED_KEY)))
        except Exception as exc:  # a scrape must not fail because Redis blipped
            log.warning("queue depth unavailable: %s", exc)
        yield family
        yield running
        yield live
        yield queued


def multiprocess_enabled() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def render(connection=None) -> tuple[bytes, str]:
    """The exposition text for /metrics: this process (or every process in multiprocess mode) + queues."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    if connection is not None:
        queue_registry = CollectorRegistry()
        queue_registry.register(QueueDepthCollector(connection))
        body += generate_latest(queue_registry)
    return body, CONTENT_TYPE_LATEST
