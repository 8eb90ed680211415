"""Storage's small behaviours, pinned so that mutation testing (bench/mutation.py) has something to fail:
key layout, client configuration, default content type and expiry, delete, counters and error paths.
Everything runs against the real SeaweedFS endpoint of the session (or a dead port)."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from gateway_support import s3_settings

from devtools.devstack import free_port
from service import metrics
from service.config import S3Settings
from service.storage import (
    LIFECYCLE_RULE_ID,
    Storage,
    StorageError,
    attention_array_key,
    attention_grid_key,
    input_key,
    inversion_arrays_key,
    inversion_reconstruction_key,
    output_key,
)


@pytest.fixture
def storage(s3):
    return Storage(s3_settings(s3))


def test_every_object_key_has_its_exact_layout():
    assert input_key("e1") == "edits/e1/input.png"
    assert output_key("e1", 3) == "edits/e1/output-3.png"
    assert attention_grid_key("e1", 1) == "edits/e1/attn-1.png"
    assert attention_array_key("e1", 1) == "edits/e1/attn-1.npy"
    assert inversion_arrays_key("i9") == "edits/i9/inversion.safetensors"
    assert inversion_reconstruction_key("i9") == "edits/i9/reconstruction.png"
    assert LIFECYCLE_RULE_ID == "editserve-edits-retention"


def test_the_clients_are_configured_as_documented(s3):
    storage = Storage(s3_settings(s3, max_attempts=4, retry_mode="adaptive", region="eu-west-3"))
    config = storage.client.meta.config
    assert config.signature_version == "s3v4" and config.s3 == {"addressing_style": "path"}
    assert (config.connect_timeout, config.read_timeout) == (10.0, 30.0)
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 4}
    assert storage.client.meta.region_name == "eu-west-3"
    assert storage.client.meta.endpoint_url == s3.endpoint_url
    probe = storage._probe_client.meta.config
    assert (probe.connect_timeout, probe.read_timeout) == (2.0, 6.0)
    assert probe.retries == {"mode": "adaptive", "total_max_attempts": 1}
    assert storage._probe_client is not storage.client
    assert storage._presign_client is storage.client  # no public endpoint: the same client
    public = Storage(s3_settings(s3, public_endpoint_url="https://cdn.example.com"))
    assert public._presign_client is not public.client
    assert public._presign_client.meta.endpoint_url == "https://cdn.example.com"
    assert public.client.meta.endpoint_url == s3.endpoint_url
    creds = storage.client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == (s3.access_key, s3.secret_key)


def test_default_content_type_and_default_expiry(s3):
    storage = Storage(s3_settings(s3, presign_expiry_seconds=123))
    key = f"{s3.test_prefix}edits/defaults/blob"
    storage.put_bytes(key, b"raw")
    assert storage.client.head_object(Bucket=s3.bucket, Key=key)["ContentType"] == "application/octet-stream"
    url, expires_at = storage.presign_get(key)
    assert "X-Amz-Expires=123" in url and expires_at.microsecond == 0
    assert f"/{s3.bucket}/{key}?" in url
    assert httpx.get(url).content == b"raw"


def test_delete_removes_the_object_and_a_failed_delete_is_a_storage_error(storage, s3):
    key = f"{s3.test_prefix}edits/deleted/input.png"
    storage.put_bytes(key, b"gone soon", "image/png")
    storage.delete(key)
    with pytest.raises(StorageError):
        storage.get_bytes(key)
    dead = Storage(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1))
    with pytest.raises(StorageError, match=r"delete of s3://editserve/edits/x/input.png failed"):
        dead.delete("edits/x/input.png")


def counter(operation: str, outcome: str) -> float:
    return metrics.s3_operations_total.labels(operation=operation, outcome=outcome)._value.get()


def test_calls_are_counted_by_operation_and_outcome_and_one_attempt_is_not_logged(storage, s3, caplog):
    caplog.set_level(logging.WARNING, logger="service.storage")
    key = f"{s3.test_prefix}edits/counted/output-0.png"
    before = {(op, out): counter(op, out) for op in ("upload", "download") for out in ("ok", "error")}
    storage.put_bytes(key, b"x")
    storage.put_bytes(key, b"y")
    assert storage.get_bytes(key) == b"y"
    with pytest.raises(StorageError, match=r"^download of s3://.*missing failed after 1 attempt\(s\): "):
        storage.get_bytes(f"{s3.test_prefix}missing")
    after = {k: counter(*k) for k in before}
    assert {k: after[k] - before[k] for k in before} == {
        ("upload", "ok"): 2, ("upload", "error"): 0, ("download", "ok"): 1, ("download", "error"): 1}
    assert not [r for r in caplog.records if "attempts" in r.message]


def test_bucket_errors_are_storage_errors(s3):
    dead = Storage(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1))
    with pytest.raises(StorageError, match="S3 unreachable"):
        dead.ensure_bucket_and_lifecycle()
    forged = Storage(s3_settings(s3, bucket=f"forged-{int(time.time() * 1000)}", secret_access_key="wrong"))
    with pytest.raises(StorageError, match="cannot create bucket 'forged-"):
        forged.ensure_bucket_and_lifecycle()


def test_the_lifecycle_rule_sent_is_the_documented_one(s3, monkeypatch):
    storage = Storage(s3_settings(s3, retention_days=3))
    sent = {}
    real = storage.client.put_bucket_lifecycle_configuration

    def spy(**kwargs):
        sent.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(storage.client, "put_bucket_lifecycle_configuration", spy)
    storage.ensure_bucket_and_lifecycle()
    assert sent == {"Bucket": s3.bucket, "LifecycleConfiguration": {"Rules": [{
        "ID": "editserve-edits-retention", "Filter": {"Prefix": "edits/"}, "Status": "Enabled",
        "Expiration": {"Days": 3}}]}}


@pytest.fixture
def s3_faults(s3_server):
    from devtools.faultproxy import HttpFaultProxy

    proxy = HttpFaultProxy(s3_server.endpoint_url)
    yield proxy
    proxy.close()


def test_a_bucket_that_already_exists_is_not_an_error(s3, s3_faults):
    """head_bucket refused (403 from the proxy), then create_bucket answers that the bucket exists
    (the real server): the bucket is there, so ensure_bucket_and_lifecycle goes on."""
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=1))
    s3_faults.fault = lambda method, path, n: 403 if method == "HEAD" else None
    storage.ensure_bucket_and_lifecycle()
    puts = [outcome for _, method, path, outcome in s3_faults.log
            if method == "PUT" and path.split("?")[0].rstrip("/").endswith(s3.bucket)]
    assert puts and puts[0] == "409"


@pytest.mark.parametrize("code", ["BucketAlreadyOwnedByYou", "BucketAlreadyExists"])
def test_either_already_exists_answer_is_accepted(s3, monkeypatch, code):
    from botocore.exceptions import ClientError

    storage = Storage(s3_settings(s3))

    def refused(**kwargs):
        raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    def exists(**kwargs):
        raise ClientError({"Error": {"Code": code, "Message": "exists"}}, "CreateBucket")

    monkeypatch.setattr(storage.client, "head_bucket", refused)
    monkeypatch.setattr(storage.client, "create_bucket", exists)
    storage.ensure_bucket_and_lifecycle()  # no StorageError


def test_an_unsupported_lifecycle_rule_is_logged_with_the_reason(s3, s3_faults, caplog):
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=1))
    s3_faults.fault = lambda method, path, n: 501 if "lifecycle" in path else None
    caplog.set_level(logging.WARNING, logger="service.storage")
    storage.ensure_bucket_and_lifecycle()
    messages = [r.getMessage() for r in caplog.records if r.name == "service.storage"]
    assert len(messages) == 1
    assert messages[0].startswith("S3 lifecycle rule not applied (server may not support it): ")
    assert "SlowDown" in messages[0]  # the error itself, as the proxy answered it


def test_a_second_attempt_is_logged_with_what_needed_it(s3, s3_faults, caplog):
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=3))
    key = f"{s3.test_prefix}edits/twice/output-0.png"
    failing = {"left": 1}

    def first_only(method, path, n):
        if method == "PUT" and path.split("?")[0].endswith(key) and failing["left"]:
            failing["left"] -= 1
            return 503
        return None

    s3_faults.fault = first_only
    caplog.set_level(logging.WARNING, logger="service.storage")
    storage.put_bytes(key, b"data")
    assert [r.getMessage() for r in caplog.records if r.name == "service.storage"] == [
        f"upload of s3://{s3.bucket}/{key} needed 2 attempts"]
