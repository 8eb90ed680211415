"""SDK methods for dataset jobs (``POST /v1/datasets``), mixed into ``Client`` and ``AsyncClient``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from editserve.contract import API_VERSION, CaptionTriplet, Dataset, DatasetRequest

TERMINAL = ("succeeded", "failed", "canceled")


def dataset_request(triplets: Sequence[CaptionTriplet | Mapping[str, Any]] | None, fields: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """The request validated locally (same errors as the server's 422) and dumped as JSON."""
    from editserve.client import _local_validation_error

    values = {k: v for k, v in fields.items() if v is not None}
    if triplets is not None:
        values["triplets"] = [t.model_dump() if isinstance(t, CaptionTriplet) else dict(t) for t in triplets]
    try:
        return DatasetRequest.model_validate(values).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        raise _local_validation_error(exc) from exc


def _dataset_id(dataset: str | Dataset) -> str:
    return dataset.id if isinstance(dataset, Dataset) else str(dataset)


def _download_items(dataset: Dataset, folder: Path) -> list[tuple[str, Path]]:
    if dataset.output is None:
        raise ValueError(f"dataset {dataset.id} is {dataset.status.value}: it has no output yet")
    out = dataset.output
    items = [(out.manifest_url, folder / "manifest.json"), (out.metadata_url, folder / "metadata.jsonl")]
    items += [(url, folder / f"shard-{i:05d}.tar") for i, url in enumerate(out.shard_urls)]
    return items


class DatasetMethods:
    """``create_dataset``, ``get_dataset``, ``cancel_dataset``, ``wait_dataset``, ``download_dataset``."""

    def create_dataset(self, triplets: Sequence[CaptionTriplet | Mapping[str, Any]] | None = None, *,
                       triplets_key: str | None = None, samples_per_triplet: int | None = None,
                       p2p_fraction: tuple[float, float] | None = None, guidance: tuple[float, float] | None = None,
                       thresholds: Mapping[str, float] | None = None, keep_best: int | None = None,
                       model: str | None = None, steps: int | None = None, size: int | None = None,
                       height: int | None = None, width: int | None = None, seed: int | None = None,
                       webhook: str | Mapping[str, Any] | None = None, **extra: Any) -> Dataset:
        """Start a dataset job from inline (input, instruction, output) triplets or a JSONL object in the bucket."""
        from editserve.client import _Call, _webhook

        fields = dict(triplets_key=triplets_key, samples_per_triplet=samples_per_triplet, p2p_fraction=p2p_fraction,
                      guidance=guidance, thresholds=thresholds, keep_best=keep_best, model=model, steps=steps,
                      height=height or size, width=width or size, seed=seed, webhook=_webhook(webhook), **extra)
        body = dataset_request(triplets, fields)
        return Dataset.model_validate(self._json(_Call("POST", f"/{API_VERSION}/datasets", json_body=body)))

    def get_dataset(self, dataset: str | Dataset) -> Dataset:
        from editserve.client import _Call

        return Dataset.model_validate(self._json(_Call("GET", f"/{API_VERSION}/datasets/{_dataset_id(dataset)}")))

    def cancel_dataset(self, dataset: str | Dataset) -> Dataset:
        from editserve.client import _Call

        path = f"/{API_VERSION}/datasets/{_dataset_id(dataset)}/cancel"
        return Dataset.model_validate(self._json(_Call("POST", path)))

    def wait_dataset(self, dataset: str | Dataset, timeout: float | None = None, poll: float = 1.0) -> Dataset:
        """Poll until the job is terminal (``TimeoutError`` after ``timeout`` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = self.get_dataset(dataset)
            if current.status.value in TERMINAL:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"dataset {current.id} still {current.status.value} after {timeout}s")
            time.sleep(poll)

    def download_dataset(self, dataset: str | Dataset, folder: str | os.PathLike) -> list[Path]:
        """Save manifest.json, metadata.jsonl and the WebDataset shards of a finished job into ``folder``."""
        from editserve.client import _write_atomically

        current = dataset if isinstance(dataset, Dataset) else self.get_dataset(dataset)
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        saved = []
        for url, path in _download_items(current, target):
            _write_atomically(path, self._fetch(url))
            saved.append(path)
        return saved


class AsyncDatasetMethods:
    """The async twins of :class:`DatasetMethods`."""

    async def create_dataset(self, triplets: Sequence[CaptionTriplet | Mapping[str, Any]] | None = None, *,
                             webhook: str | Mapping[str, Any] | None = None, size: int | None = None,
                             **fields: Any) -> Dataset:
        from editserve.client import _Call, _webhook

        if size is not None:
            fields.setdefault("height", size)
            fields.setdefault("width", size)
        body = dataset_request(triplets, {**fields, "webhook": _webhook(webhook)})
        return Dataset.model_validate(await self._json(_Call("POST", f"/{API_VERSION}/datasets", json_body=body)))

    async def get_dataset(self, dataset: str | Dataset) -> Dataset:
        from editserve.client import _Call

        path = f"/{API_VERSION}/datasets/{_dataset_id(dataset)}"
        return Dataset.model_validate(await self._json(_Call("GET", path)))

    async def cancel_dataset(self, dataset: str | Dataset) -> Dataset:
        from editserve.client import _Call

        path = f"/{API_VERSION}/datasets/{_dataset_id(dataset)}/cancel"
        return Dataset.model_validate(await self._json(_Call("POST", path)))

    async def wait_dataset(self, dataset: str | Dataset, timeout: float | None = None, poll: float = 1.0) -> Dataset:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            current = await self.get_dataset(dataset)
            if current.status.value in TERMINAL:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"dataset {current.id} still {current.status.value} after {timeout}s")
            await asyncio.sleep(poll)

    async def download_dataset(self, dataset: str | Dataset, folder: str | os.PathLike) -> list[Path]:
        from editserve.client import _write_atomically

        current = dataset if isinstance(dataset, Dataset) else await self.get_dataset(dataset)
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        saved = []
        for url, path in _download_items(current, target):
            _write_atomically(path, await self._fetch(url))
            saved.append(path)
        return saved
