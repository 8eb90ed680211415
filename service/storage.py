"""S3 access for inputs, results and attention maps (boto3, SigV4, path-style addressing).

Retries are botocore's own (``retry_mode`` standard by default: up to ``max_attempts`` attempts per call,
truncated exponential backoff with full jitter, a per-client retry quota so a long outage stops retrying
instead of multiplying load): connection errors, timeouts, 5xx and throttling are retried, other 4xx are not.

Why path-style: MinIO, SeaweedFS and LocalStack all serve it without wildcard DNS. Clients never see S3
credentials: they get presigned GET URLs with an explicit ``expires_at``. Presigning is a local computation,
so a separate ``public_endpoint_url`` (what browsers can reach) gets its own client that never talks to S3.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from functools import cached_property

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service import metrics
from service.config import S3Settings

log = logging.getLogger(__name__)

EDITS_PREFIX = "edits/"
LIFECYCLE_RULE_ID = "editserve-edits-retention"


class StorageError(RuntimeError):
    """S3 could not be reached or refused the operation (after retries where they apply)."""


def input_key(edit_id: str) -> str:
    return f"{EDITS_PREFIX}{edit_id}/input.png"


def output_key(edit_id: str, index: int) -> str:
    return f"{EDITS_PREFIX}{edit_id}/output-{index}.png"


def attention_grid_key(edit_id: str, prompt_index: int) -> str:
    return f"{EDITS_PREFIX}{edit_id}/attn-{prompt_index}.png"


def preview_key(edit_id: str, step: int) -> str:
    """One object per preview step (the SSE event of step k keeps pointing at step k's picture); the edit's
    prefix goes with its retention like every other output."""
    return f"{EDITS_PREFIX}{edit_id}/preview-{step}.webp"


def attention_array_key(edit_id: str, prompt_index: int) -> str:
    return f"{EDITS_PREFIX}{edit_id}/attn-{prompt_index}.npy"


def inversion_arrays_key(inversion_id: str) -> str:
    """An inversion is an edit-like record: its objects live under ``edits/`` and share the edits' retention."""
    return f"{EDITS_PREFIX}{inversion_id}/inversion.safetensors"


def inversion_reconstruction_key(inversion_id: str) -> str:
    return f"{EDITS_PREFIX}{inversion_id}/reconstruction.png"


class Storage:
    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.bucket = settings.bucket
        self._attempts = threading.local()

    def _make_client(self, endpoint_url: str | None, *, timeout: float = 10.0, max_attempts: int | None = None):
        client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=self.settings.access_key_id,
            aws_secret_access_key=self.settings.secret_access_key,
            region_name=self.settings.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          connect_timeout=timeout, read_timeout=timeout * 3,
                          retries={"mode": self.settings.retry_mode,
                                   "total_max_attempts": max_attempts or self.settings.max_attempts}),
        )
        client.meta.events.register("before-send.s3", self._count_attempt)
        return client

    def _count_attempt(self, **_kwargs) -> None:
        """Called by botocore before every attempt (retries included), on the calling thread."""
        self._attempts.count = getattr(self._attempts, "count", 0) + 1

    @cached_property
    def client(self):
        return self._make_client(self.settings.endpoint_url)

    @cached_property
    def _presign_client(self):
        endpoint = self.settings.public_endpoint_url or self.settings.endpoint_url
        if endpoint == self.settings.endpoint_url:
            return self.client
        return self._make_client(endpoint)

    @cached_property
    def _probe_client(self):
        """Readiness probes must answer fast: one attempt, short timeouts."""
        return self._make_client(self.settings.endpoint_url, timeout=2.0, max_attempts=1)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload (botocore retries transient failures); StorageError once they are spent or for a 4xx."""
        self._call(f"upload of s3://{self.bucket}/{key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=content_type))

    def get_bytes(self, key: str) -> bytes:
        return self._call(f"download of s3://{self.bucket}/{key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=key)["Body"].read())

    def _call(self, what: str, operation):
        """One S3 call, retried by botocore; its errors become StorageError naming the attempts made."""
        operation_label = what.split(" ", 1)[0]  # "upload" / "download": bounded, never the key
        self._attempts.count = 0
        try:
            result = operation()
        except (BotoCoreError, ClientError) as exc:
            metrics.s3_operations_total.labels(operation=operation_label, outcome="error").inc()
            attempts = max(1, self._attempts.count)
            raise StorageError(f"{what} failed after {attempts} attempt(s): {exc}") from exc
        metrics.s3_operations_total.labels(operation=operation_label, outcome="ok").inc()
        if self._attempts.count > 1:
            log.warning("%s needed %d attempts", what, self._attempts.count)
        return result

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"delete of s3://{self.bucket}/{key} failed: {exc}") from exc

    def presign_get(self, key: str, expires: int | None = None) -> tuple[str, datetime]:
        """A GET URL valid for ``expires`` seconds (default: settings), and when it stops working."""
        seconds = int(expires or self.settings.presign_expiry_seconds)
        expires_at = datetime.now(UTC) + timedelta(seconds=seconds)
        url = self._presign_client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=seconds
        )
        return url, expires_at.replace(microsecond=0)

    def head_bucket(self) -> None:
        """Raise StorageError unless the bucket answers (used by /readyz)."""
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"bucket {self.bucket!r} unreachable: {exc}") from exc

    def ensure_bucket_and_lifecycle(self) -> None:
        """Create the bucket if missing and expire ``edits/`` after ``retention_days``.

        Some S3 implementations (SeaweedFS, older MinIO setups) do not implement lifecycle rules; that is
        logged, not fatal, because records in Redis expire on the same schedule anyway.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise StorageError(f"cannot create bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 unreachable: {exc}") from exc
        rule = {
            "ID": LIFECYCLE_RULE_ID,
            "Filter": {"Prefix": EDITS_PREFIX},
            "Status": "Enabled",
            "Expiration": {"Days": self.settings.retention_days},
        }
        try:
            self.client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": [rule]}
            )
        except (BotoCoreError, ClientError) as exc:
            log.warning("S3 lifecycle rule not applied (server may not support it): %s", exc)
