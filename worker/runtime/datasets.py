"""The dataset driver: fans dataset jobs out into low-priority P2P edits, filters and writes what they made.

Every worker runs one on a thread (and ``python -m worker.runtime.datasets`` runs one alone). Each pass
takes, per active job, a short Redis lease (so one driver advances a job at a time; a dead driver's lease
expires), then:

1. collects every fanned-out triplet whose sample edits are all finished: reads their CLIP scores from the
   edit records, applies the keep rule and ranking (``worker.scoring.selection``), writes the kept pairs to
   the triplet's part object (fixed key: a redo overwrites) and counts the triplet once (a guarded script);
2. fans out further triplets while the job has fewer than ``datasets.window_samples`` samples in flight
   (always at least one triplet): their edit ids are recorded first, then the edits created, so ids whose
   records are missing after a crash are simply created by the next pass;
3. when every triplet is collected, writes the WebDataset shards, ``metadata.jsonl`` and ``manifest.json``
   from the parts (in triplet order, deterministic bytes) and marks the job succeeded.

Interactive edits go first because samples are queued at priority ``low`` (workers claim high → normal →
low, and a batch drains same-key jobs in that order too), and because the window keeps only a bounded number
of samples queued at once: an edit submitted mid-job waits at most for the batch that is running.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import tarfile
import threading
import time

import redis

from editserve.contract import CaptionTriplet, EditStatus
from service.config import Settings, get_settings
from service.datasets import (
    SHARD_PAIRS,
    DatasetStore,
    manifest_object,
    metadata_object,
    part_object,
    sample_key,
    sample_payload,
    shard_object,
    triplet_plan,
    triplets_object,
)
from service.jobstore import EditConflict, EditNotFound, JobStore, new_edit_id
from service.keys import edit_key
from service.limits import LimitExceeded
from service.storage import Storage
from worker.scoring.selection import PairScores, Thresholds, keep_and_rank

log = logging.getLogger("editserve.datasets")
Q, P, S, C = EditStatus.queued, EditStatus.processing, EditStatus.succeeded, EditStatus.canceled
TERMINAL = {s.value for s in EditStatus if s.terminal}


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, bytes) in the given order with fixed metadata: the same members give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]


class DatasetDriver:
    def __init__(self, connection: redis.Redis, settings: Settings, *, store: JobStore | None = None,
                 storage: Storage | None = None, owner: str | None = None):
        self.settings = settings
        self.storage = storage or Storage(settings.s3)
        self.jobs = store or JobStore(connection, settings, self.storage)
        self.datasets = DatasetStore(connection, settings, self.storage)
        self.redis = connection
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{new_edit_id()[-6:]}"
        self._triplets: dict[str, list[CaptionTriplet]] = {}

    # ------------------------------------------------------------------ one pass
    def tick(self) -> int:
        """Advance every active job this driver can lease; returns how many it advanced."""
        advanced = 0
        for dataset_id in self.datasets.active():
            if not self.datasets.take_lease(dataset_id, self.owner):
                continue
            try:
                self.advance(dataset_id)
                advanced += 1
            except Exception:  # noqa: BLE001 — one job's trouble (S3 down, a bug) must not stop the others
                log.exception("dataset %s: pass failed; retried on the next pass", dataset_id)
            finally:
                self.datasets.release_lease(dataset_id, self.owner)
        return advanced

    def advance(self, dataset_id: str) -> None:
        record = self.datasets.record(dataset_id)
        if record is None:
            self.datasets.retire(dataset_id, None)
            return
        status = EditStatus(record["status"])
        if status is C:
            self._cancel_samples(dataset_id, record["tenant"])
            self.datasets.retire(dataset_id, record["tenant"])
            return
        if status.terminal:
            self.datasets.retire(dataset_id, record["tenant"])
            return
        if status is Q and self.datasets.transition(dataset_id, (Q,), P, started_at=True):
            self.datasets.emit(dataset_id, "started")
        params = json.loads(record["params"])
        triplets = self._load_triplets(dataset_id)
        done_before = int(record.get("done", 0))
        for index, ids in sorted(self.datasets.inflight(dataset_id).items()):
            statuses = self._statuses(ids)
            missing = [edit_id for edit_id, s in zip(ids, statuses) if s is None]
            if missing:
                self._create(dataset_id, record["tenant"], params, triplets, index, ids, missing)
            elif all(s in TERMINAL for s in statuses):
                self._collect(dataset_id, params, triplets, index, ids)
        self._fan_out(dataset_id, record["tenant"], params, triplets)
        record = self.datasets.record(dataset_id) or record
        done = int(record.get("done", 0))
        if done > done_before and done < len(triplets):
            self.datasets.emit(dataset_id, "progress", step=done)
        if done >= len(triplets) and record["status"] == P.value:
            self._finish(dataset_id, record)

    # ------------------------------------------------------------------ fan-out
    def _fan_out(self, dataset_id: str, tenant: str, params: dict, triplets: list[CaptionTriplet]) -> None:
        per_triplet = params["samples_per_triplet"]
        in_flight = sum(len(ids) for ids in self.datasets.inflight(dataset_id).values())
        window = self.settings.datasets.window_samples
        record = self.datasets.record(dataset_id) or {}
        nxt = int(record.get("next", len(triplets)))
        while nxt < len(triplets) and (in_flight == 0 or in_flight + per_triplet <= window):
            ids = [new_edit_id() for _ in range(per_triplet)]
            if not self.datasets.plan(dataset_id, nxt, ids):
                return
            if not self._create(dataset_id, tenant, params, triplets, nxt, ids, ids):
                return
            in_flight += per_triplet
            nxt += 1

    def _create(self, dataset_id: str, tenant: str, params: dict, triplets: list[CaptionTriplet], index: int,
                ids: list[str], which: list[str]) -> bool:
        """Create the sample edits ``which`` (of triplet ``index``); False when the queue limits refuse more."""
        plan = triplet_plan(params["seed"], index, len(ids), tuple(params["p2p_fraction"]), tuple(params["guidance"]))
        wanted = set(which)
        for sample, edit_id in enumerate(ids):
            if edit_id not in wanted:
                continue
            payload = sample_payload(dataset_id, tenant, params, index, triplets[index], plan[sample], edit_id)
            try:
                self.jobs.create(payload, webhook=None, idempotency_key=None)
            except LimitExceeded as exc:
                log.info("dataset %s: queue limits refuse more samples for now (%s)", dataset_id, exc)
                return False
        return True

    def _statuses(self, ids: list[str]) -> list[str | None]:
        with self.redis.pipeline(transaction=False) as pipe:
            for edit_id in ids:
                pipe.hget(edit_key(edit_id), "status")
            return [s.decode() if s is not None else None for s in pipe.execute()]

    # ------------------------------------------------------------------ collect one triplet
    def _collect(self, dataset_id: str, params: dict, triplets: list[CaptionTriplet], index: int,
                 ids: list[str]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            for edit_id in ids:
                pipe.hmget(edit_key(edit_id), "status", "results")
            rows = pipe.execute()
        plan = triplet_plan(params["seed"], index, len(ids), tuple(params["p2p_fraction"]), tuple(params["guidance"]))
        scored, failed = [], 0
        for sample, (edit_id, (status, results)) in enumerate(zip(ids, rows)):
            items = json.loads(results) if status == S.value.encode() and results else []
            scores = items[1].get("scores") if len(items) > 1 else None
            if not scores:
                failed += 1
                continue
            pair = PairScores(**{k: float(scores[k]) for k in ("image_image", "input_caption", "output_caption",
                                                               "directional")})
            scored.append(((sample, edit_id, items, pair), pair))
        kept = keep_and_rank(scored, Thresholds(**params["thresholds"]), params["keep_best"])
        if kept:
            members = []
            for rank, (sample, edit_id, items, pair) in enumerate(kept):
                key = sample_key(index, sample)
                meta = self._metadata(dataset_id, index, triplets[index], plan[sample], edit_id, pair, rank)
                members += [(f"{key}.input.png", self.storage.get_bytes(items[0]["key"])),
                            (f"{key}.edited.png", self.storage.get_bytes(items[1]["key"])),
                            (f"{key}.json", json.dumps(meta, sort_keys=True).encode())]
            self.storage.put_bytes(part_object(dataset_id, index), tar_bytes(members), "application/x-tar")
        self.datasets.collect(dataset_id, index, samples=len(scored), kept=len(kept), failed=failed)

    @staticmethod
    def _metadata(dataset_id: str, index: int, triplet: CaptionTriplet, plan, edit_id: str, pair: PairScores,
                  rank: int) -> dict:
        return {"key": sample_key(index, plan.sample), "dataset": dataset_id, "triplet": index,
                "input": triplet.input, "instruction": triplet.instruction, "output": triplet.output,
                "sample": plan.sample, "seed": plan.seed, "p2p_fraction": plan.p2p_fraction,
                "guidance": plan.guidance, "rank": rank, "edit_id": edit_id, "clip": pair.as_dict()}

    # ------------------------------------------------------------------ the output
    def _finish(self, dataset_id: str, record: dict[str, str]) -> None:
        """Shards, metadata.jsonl and manifest.json from the parts, in triplet order; then succeeded."""
        shards: list[tuple[str, int]] = []
        lines: list[bytes] = []
        members: list[tuple[str, bytes]] = []
        pairs_in_shard = 0

        def flush() -> None:
            nonlocal members, pairs_in_shard
            if pairs_in_shard:
                key = shard_object(dataset_id, len(shards))
                self.storage.put_bytes(key, tar_bytes(members), "application/x-tar")
                shards.append((key, pairs_in_shard))
            members, pairs_in_shard = [], 0

        for index in sorted(self.datasets.kept_triplets(dataset_id)):
            part = tar_members(self.storage.get_bytes(part_object(dataset_id, index)))
            for start in range(0, len(part), 3):  # one pair = input, edited, json
                if pairs_in_shard == SHARD_PAIRS:
                    flush()
                members += part[start:start + 3]
                lines.append(part[start + 2][1] + b"\n")
                pairs_in_shard += 1
        flush()
        params = json.loads(record["params"])
        counts = {"triplets": int(record["total"]), "samples": int(record["c_samples"]),
                  "kept": int(record["c_kept"]), "failed_samples": int(record["c_failed"]),
                  "triplets_with_pairs": int(record["c_with_pairs"])}
        if sum(n for _, n in shards) != counts["kept"]:
            raise RuntimeError(f"parts hold {sum(n for _, n in shards)} pairs, the counts say {counts['kept']}")
        manifest = {
            "dataset": dataset_id, "format": "webdataset",
            "sample_files": {"input.png": "input image (caption `input`)", "edited.png": "edited image",
                             "json": "triplet, seed, p2p_fraction, guidance, rank, CLIP scores"},
            "shards": [{"key": k, "pairs": n} for k, n in shards], "metadata": metadata_object(dataset_id),
            "counts": counts, "params": params, "random_weights": self._random_weights(params["model"]),
        }
        self._put(metadata_object(dataset_id), b"".join(lines), "application/jsonl")
        self.storage.put_bytes(manifest_object(dataset_id), json.dumps(manifest, indent=1).encode(),
                               "application/json")
        output = {"manifest": manifest_object(dataset_id), "metadata": metadata_object(dataset_id),
                  "shards": [k for k, _ in shards]}
        if self.datasets.transition(dataset_id, (P,), S, completed_at=True, fields={"output": json.dumps(output)}):
            self.datasets.emit(dataset_id, "completed")
        self.datasets.retire(dataset_id, record["tenant"])
        for index in self.datasets.kept_triplets(dataset_id):
            try:
                self.storage.delete(part_object(dataset_id, index))
            except Exception:  # noqa: BLE001 — leftovers expire with the bucket's retention
                pass

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        """``put_bytes``; an empty object goes through a one-off client: SeaweedFS answers an empty PUT in a
        way that leaves the pooled connection unreadable (the next request then times out)."""
        if data:
            self.storage.put_bytes(key, data, content_type)
            return
        client = self.storage._make_client(self.storage.settings.endpoint_url)
        try:
            client.put_object(Bucket=self.storage.bucket, Key=key, Body=data, ContentType=content_type)
        finally:
            client.close()

    def _random_weights(self, model: str) -> bool:
        spec = self.settings.model_catalog().get(model)
        return bool(spec and spec.random_weights)

    def _cancel_samples(self, dataset_id: str, tenant: str) -> None:
        for ids in self.datasets.inflight(dataset_id).values():
            for edit_id in ids:
                try:
                    self.jobs.request_cancel(edit_id, tenant)
                except (EditConflict, EditNotFound):
                    pass

    def _load_triplets(self, dataset_id: str) -> list[CaptionTriplet]:
        if dataset_id not in self._triplets:
            data = self.storage.get_bytes(triplets_object(dataset_id))
            self._triplets[dataset_id] = [CaptionTriplet.model_validate_json(line)
                                          for line in data.splitlines() if line.strip()]
        return self._triplets[dataset_id]


class DatasetDriverThread(threading.Thread):
    """Runs ``driver.tick()`` every ``interval`` seconds until stopped (a worker's companion thread)."""

    def __init__(self, driver: DatasetDriver, interval: float):
        super().__init__(name="editserve-datasets", daemon=True)
        self.driver = driver
        self.interval = interval
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.driver.tick()
            except Exception:  # noqa: BLE001 — Redis down: try again next interval
                log.exception("dataset driver pass failed")
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Drive dataset jobs (workers run one each; this runs one alone).")
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    driver = DatasetDriver(redis.Redis.from_url(settings.redis_url), settings)
    if args.once:
        driver.tick()
        return 0
    thread = DatasetDriverThread(driver, settings.datasets.driver_interval_seconds)
    thread.start()
    try:
        while thread.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        thread.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
