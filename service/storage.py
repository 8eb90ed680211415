"""S3 access for inputs, results and attention maps (boto3, SigV4, path-style addressing).

Why path-style: MinIO, SeaweedFS and LocalStack all serve it without wildcard DNS. Clients never see S3
credentials: they get presigned GET URLs with an explicit ``expires_at``. Presigning is a local computation,
so a separate ``public_endpoint_url`` (what browsers can reach) gets its own client that never talks to S3.
"""

from __future__ import annotations

import logging
import time
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

    def _make_client(self, endpoint_url: str | None, *, timeout: float = 10.0):
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=self.settings.access_key_id,
            aws_secret_access_key=self.settings.secret_access_key,
            region_name=self.settings.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          connect_timeout=timeout, read_timeout=timeout * 3,
                          retries={"total_max_attempts": 1}),
        )

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
        return self._make_client(self.settings.endpoint_url, timeout=2.0)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Upload with bounded retries (exponential backoff); StorageError after the last attempt."""
        self._with_retries(f"upload of s3://{self.bucket}/{key}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=key, Body=data, ContentType=content_type))

    def get_bytes(self, key: str) -> bytes:
        return self._with_retries(f"download of s3://{self.bucket}/{key}", lambda: self.client.get_object(
            Bucket=self.bucket, Key=key)["Body"].read(), retry_client_errors=False)

    def _with_retries(self, what: str, operation, *, retry_client_errors: bool = True):
        """Our retries, not botocore's (its client makes one attempt), so attempts and backoff follow settings."""
        attempts = self.settings.upload_attempts
        operation_label = what.split(" ", 1)[0]  # "upload" / "download": bounded, never the key
        for attempt in range(1, attempts + 1):
            try:
                result = operation()
                metrics.s3_operations_total.labels(operation=operation_label, outcome="ok").inc()
                return result
            except (BotoCoreError, ClientError) as exc:
                metrics.s3_operations_total.labels(operation=operation_label, outcome="error").inc()
                permanent = isinstance(exc, ClientError) and (
                    not retry_client_errors
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500) < 500)
                if permanent or attempt == attempts:
                    raise StorageError(f"{what} failed after {attempt} attempt(s): {exc}") from exc
                delay = self.settings.upload_backoff_seconds * 2 ** (attempt - 1)
                log.warning("%s failed (attempt %d/%d): %s; retrying in %.2fs", what, attempt, attempts, exc, delay)
                time.sleep(delay)

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
