"""The GPU worker process: ``python -m worker.runtime.worker --models tiny-sd,tiny-ip2p --name W``.

Why not ``rq worker``: the forking Worker would reload the models for every job (and cannot fork after CUDA
is initialised), and no RQ worker batches. This process loads its models once, then loops: gather one batch
of a single batch key (``batching``), start it, hand the batch that ran before to the finisher thread
(``finishing``: uploads, marks, RQ), run this one (``processing``), repeat — so a batch's finishing overlaps
the next batch's run. A reaper thread recovers jobs of dead workers; a Prometheus endpoint serves this
process's metrics.

With ``worker.batching == "step"`` the loop instead drives ``continuous.ContinuousLoop``: one running batch
per model that jobs join and leave between denoising steps (warm shutdown: no more claims, the running and
already-claimed jobs finish).

Signals: the first SIGTERM/SIGINT finishes the running batch and drains the finisher, then exits 0 (warm
shutdown). A second one aborts: every job still running stops at its next denoising step and is requeued at
the front of its queue (by the finisher, drained before exit like any batch).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import time

import redis

from service import liveness, redisconn
from service.config import Settings, get_settings
from service.jobstore import JobStore
from service.webhooks.emit import emit as emit_webhook
from service.storage import Storage
from worker.models.registry import ModelRegistry
from worker.runtime.datasets import DatasetDriver, DatasetDriverThread
from worker.runtime.batching import BatchGatherer, ClaimedJob, GatherPolicy, QueueClaimer
from worker.runtime.finishing import Finisher, FinishingBatch
from worker.runtime.processing import ActiveBatch, BatchProcessor, BatchReport, log_event
from worker.runtime.reaper import Reaper, ReaperThread
from worker.runtime.rqbridge import RqBridge

log = logging.getLogger("editserve.worker")

IDLE_WAIT_SECONDS = 1.0  # one gather's wait before the loop checks signals and heartbeats again
WORKER_HEARTBEAT_SECONDS = 30.0


class EditWorker:
    def __init__(self, settings: Settings, models: list[str], name: str | None = None, *,
                 connection: redis.Redis | None = None, registry: ModelRegistry | None = None,
                 storage: Storage | None = None):
        unknown = sorted(set(models) - set(settings.model_catalog()))
        if not models or unknown:
            raise ValueError(f"serve at least one known model; unknown: {unknown}; "
                             f"known: {sorted(settings.model_catalog())}")
        self.settings = settings
        self.models = list(models)
        self.connection = connection or redisconn.rq_client(settings.redis_url)
        self.registry = registry or ModelRegistry(settings)
        self.storage = storage or Storage(settings.s3)
        self.store = JobStore(self.connection, settings, self.storage, listeners=[emit_webhook])
        w = settings.worker
        self.bridge = RqBridge(self.connection, name or f"{socket.gethostname()}.{os.getpid()}",
                               heartbeat_ttl=w.heartbeat_ttl_seconds, result_ttl=w.result_ttl_seconds)
        self.claimer = QueueClaimer(self.connection, self.models)
        self.gatherer = BatchGatherer(self.claimer, GatherPolicy(max_batch_size=w.max_batch_size,
                                                                 max_batch_wait_ms=w.max_batch_wait_ms,
                                                                 poll_interval_ms=w.poll_interval_ms))
        self.processor = BatchProcessor(settings=settings, registry=self.registry, store=self.store,
                                        storage=self.storage, bridge=self.bridge, worker_name=self.bridge.name,
                                        aborting=lambda: self.abort_requested)
        self.finisher = Finisher(self.processor.finish)
        self.continuous = None  # step-level batching (worker.batching == "step"): one running batch per model
        if w.batching == "step":
            from worker.runtime.continuous import ContinuousLoop

            self.continuous = ContinuousLoop(processor=self.processor, claimer=self.claimer, models=self.models,
                                             stopping=self._stopping)
        self._ran: ActiveBatch | None = None  # ran, not handed to the finisher yet (see run_batch)
        self.reaper = Reaper(self.connection, settings, self.store)
        self.stop_requested = False
        self.abort_requested = False
        self._metrics_server = None

    @property
    def name(self) -> str:
        return self.bridge.name

    # ------------------------------------------------------------------ lifecycle
    def load_models(self) -> None:
        if self.settings.worker.torch_threads:
            import torch

            torch.set_num_threads(self.settings.worker.torch_threads)
        for name in self.models:
            t0 = time.monotonic()
            model = self.registry.get(name)
            log_event("model_loaded", model=name, seconds=round(time.monotonic() - t0, 2))
            self.warm_up(model)

    def warm_up(self, model) -> None:
        """Compile (and capture) the UNet step for every row bucket now, not in a user's first step; logged
        as ``warm_up`` with its seconds. Nothing to do when the step runs eager. A failing compilation turns
        it off for this worker (logged) rather than failing every batch."""
        from worker.editing.acceleration import warm_up

        acceleration = self.processor.acceleration(model)
        if not self.settings.worker.warmup or not acceleration.compiles_on(model.device):
            return
        size = model.spec.default_size
        try:
            result = warm_up(model, acceleration, height=size, width=size)
        except Exception as exc:  # noqa: BLE001 — an eager worker beats a dead one
            log_event("warm_up_failed", model=model.spec.name, error=f"{type(exc).__name__}: {exc}")
            self.settings.worker.compile = "off"
            return
        log_event("warm_up", model=model.spec.name, seconds=round(result.total_seconds, 2),
                  buckets={str(k): round(v, 2) for k, v in result.seconds.items()})

    def run_batch(self, timeout: float = IDLE_WAIT_SECONDS) -> ActiveBatch | None:
        """One turn of the loop: gather and start a batch, hand the batch that ran last turn to the finisher,
        run this one; it is handed over next turn (or by ``drain``). None when no batch came in ``timeout``.

        Why the previous batch is handed over only after this one started: its finishing (PNG encoding, boto3
        PUTs, JobStore renders) competes with this thread for the CPU and the GIL. Overlapped with the gather
        and start — short Redis round trips while the accelerator idles — it made those much slower
        (bench/service_bench.py, figures in bench/results/); during the run this thread mostly waits for the accelerator. (On a CPU-only
        box the run itself needs the CPU and the GIL, and slows by about what the finishing costs.) The
        previous batch waits for this gather's window (``max_batch_wait_ms``) at most, and is handed over at
        once when no job is waiting.
        """
        claimed = self._gather(timeout)
        if not claimed:
            return None
        self.processor.worker_name = self.name
        batch = self.processor.start(claimed)
        self._hand_over(batch)
        self._ran = self.processor.run(batch)
        return self._ran

    def run_turn(self, timeout: float = IDLE_WAIT_SECONDS) -> None:
        """One step of every running batch (step-level batching), or one batch (request-level)."""
        if self.continuous is not None:
            self.continuous.turn(timeout)
        else:
            self.run_batch(timeout)  # the previous batch's finishing overlaps this batch's run

    def run_once(self, timeout: float = IDLE_WAIT_SECONDS) -> BatchReport | None:
        """``run_batch``, then hand that batch over and wait until its jobs are settled (tests and tools want
        them terminal when this returns)."""
        if self.run_batch(timeout) is None:
            return None
        return self._hand_over().report()  # type: ignore[union-attr] — run_batch left its batch to hand over

    def drain(self) -> None:
        """Hand over the batch that ran last, if any, and wait until every batch is finished."""
        self._hand_over()
        if self.continuous is not None:
            self.continuous.wait_finished()
        self.finisher.wait()

    def _gather(self, timeout: float) -> list[ClaimedJob]:
        """With a ran batch not handed over yet, only take a batch that is already waiting; else hand it over
        first, then wait up to ``timeout`` for the next one."""
        if self._ran is not None:
            claimed = self.gatherer.gather(0, should_stop=self._stopping)
            if claimed:
                return claimed
            self._hand_over()
        return self.gatherer.gather(timeout, should_stop=self._stopping)

    def _stopping(self) -> bool:
        return self.stop_requested

    def _hand_over(self, *waiting: ActiveBatch) -> FinishingBatch | None:
        """The batch that ran last to the finisher (after the one it is finishing); ``waiting``'s heartbeats
        are renewed if that takes a while."""
        ran, self._ran = self._ran, None
        return self.finisher.submit(ran, *waiting) if ran is not None else None

    def run(self) -> int:
        self.load_models()
        self.bridge.register()
        beacon = liveness.Beacon(self.connection, self.name, self.models, self.settings.worker.heartbeat_ttl_seconds)
        beacon.start()  # after load_models: "live" means the models are loaded
        self.processor.worker_name = self.name
        reaper_thread = ReaperThread(self.reaper, self.settings.worker.reaper_interval_seconds)
        reaper_thread.start()
        dataset_thread = DatasetDriverThread(  # fans dataset jobs out into low-priority edits (datasets.py)
            DatasetDriver(self.connection, self.settings, store=self.store, storage=self.storage, owner=self.name),
            self.settings.datasets.driver_interval_seconds)
        dataset_thread.start()
        self.start_metrics_server()
        log_event("worker_started", worker=self.name, models=self.models, pid=os.getpid())
        last_heartbeat = time.monotonic()
        try:
            while not self.stop_requested or (self.continuous is not None and self.continuous.busy):
                try:
                    self.run_turn()
                except redis.RedisError as exc:
                    log.error("redis error in the worker loop: %s; retrying in 1s", exc)
                    time.sleep(1.0)
                except Exception:
                    log.exception("batch crashed; its jobs will be recovered by the reaper")
                if time.monotonic() - last_heartbeat >= WORKER_HEARTBEAT_SECONDS:
                    self.bridge.worker_heartbeat()
                    last_heartbeat = time.monotonic()
        finally:
            self.drain()  # warm shutdown finishes the last batch; after an abort this requeues its stopped jobs
            self.finisher.close()
            if self.continuous is not None:
                self.continuous.close()
            reaper_thread.stop()
            dataset_thread.stop()
            self.stop_metrics_server()
            beacon.stop()
            self.bridge.unregister()
            log_event("worker_stopped", worker=self.name, aborted=self.abort_requested)
        return 0

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self.stop_requested:
            self.abort_requested = True
            log_event("abort_requested", worker=self.name, signal=signal.Signals(signum).name)
        else:
            self.stop_requested = True
            log_event("warm_shutdown_requested", worker=self.name, signal=signal.Signals(signum).name)

    # ------------------------------------------------------------------ metrics
    def start_metrics_server(self) -> int | None:
        """Serve this process's metrics on ``worker.metrics_port`` (0 disables); returns the bound port."""
        port = self.settings.worker.metrics_port
        if not port:
            return None
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

        from service import metrics

        registry = REGISTRY
        if metrics.multiprocess_enabled():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        server, _ = start_http_server(port, registry=registry)
        self._metrics_server = server
        return server.server_address[1]

    def stop_metrics_server(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None


def wait_for_redis(url: str, timeout: float = 60.0) -> None:
    """Block (bounded) until Redis answers: a worker (re)started during a Redis outage or while Redis loads
    its AOF used to die in RQ's worker constructor and wait for its supervisor's restart back-off instead."""
    connection = redisconn.sync_client(url, socket_connect_timeout=2, socket_timeout=2)
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            connection.ping()
            return
        except redis.RedisError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("redis not answering yet (%s); retrying in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        finally:
            connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="editserve GPU worker: batches edits of the given models.")
    parser.add_argument("--models", help="comma-separated model names (default: EDITSERVE_ENABLED_MODELS)")
    parser.add_argument("--name", help="worker name (default: host.pid)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("EDITSERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("rq.worker").setLevel(logging.WARNING)  # our JSON lines already report each outcome
    settings = get_settings()
    models = [m for m in (args.models or ",".join(settings.enabled_models or [])).split(",") if m]
    wait_for_redis(settings.redis_url)
    worker = EditWorker(settings, models, args.name)
    worker.install_signal_handlers()
    return worker.run()


if __name__ == "__main__":
    raise SystemExit(main())
