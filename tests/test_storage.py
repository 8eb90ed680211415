"""Storage against a real S3 HTTP endpoint (SeaweedFS enforces SigV4 and presigned-URL expiry)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from gateway_support import s3_settings

from devtools.devstack import free_port
from devtools.faultproxy import HttpFaultProxy
from service.config import S3Settings
from service.storage import Storage, StorageError, attention_array_key, input_key, output_key


@pytest.fixture
def storage(s3):
    return Storage(s3_settings(s3))


def test_put_get_roundtrip_and_key_layout(storage, s3):
    key = f"{s3.test_prefix}edits/abc/output-0.png"
    storage.put_bytes(key, b"\x89PNG fake", "image/png")
    assert storage.get_bytes(key) == b"\x89PNG fake"
    head = storage.client.head_object(Bucket=s3.bucket, Key=key)
    assert head["ContentType"] == "image/png"
    assert input_key("e1") == "edits/e1/input.png" and output_key("e1", 2) == "edits/e1/output-2.png"
    assert attention_array_key("e1", 0) == "edits/e1/attn-0.npy"


def signed_seconds_ago(monkeypatch, seconds: float) -> None:
    """Presign as if the signer's clock were ``seconds`` behind: a URL that expired already, without sleeping
    (the S3 server's real clock judges it, as it would a URL handed out earlier)."""
    import botocore.auth

    real = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda *a, **kw: real(*a, **kw) - timedelta(seconds=seconds))


def test_presigned_url_works_then_expires(storage, s3, monkeypatch):
    key = f"{s3.test_prefix}edits/abc/input.png"
    storage.put_bytes(key, b"hello", "image/png")
    url, expires_at = storage.presign_get(key, expires=60)
    assert 59 <= (expires_at - datetime.now(UTC)).total_seconds() <= 60
    assert "X-Amz-Signature" in url and "X-Amz-Expires=60" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == b"hello"
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered).status_code == 403  # SigV4 is enforced
    signed_seconds_ago(monkeypatch, 120)
    stale, _ = storage.presign_get(key, expires=60)  # signed two minutes ago, valid for one
    assert httpx.get(stale).status_code == 403  # and so is expiry
    still_valid, _ = storage.presign_get(key, expires=300)  # signed two minutes ago, valid for five
    assert httpx.get(still_valid).status_code == 200


def test_presign_uses_the_public_endpoint(s3):
    storage = Storage(s3_settings(s3, public_endpoint_url="https://cdn.example.com"))
    url, _ = storage.presign_get("edits/x/output-0.png")
    assert url.startswith(f"https://cdn.example.com/{s3.bucket}/edits/x/output-0.png?")  # path-style


def test_get_of_a_missing_key_is_a_storage_error(storage, s3):
    with pytest.raises(StorageError, match="download"):
        storage.get_bytes(f"{s3.test_prefix}missing")


@pytest.fixture
def s3_faults(s3_server):
    """An HTTP proxy in front of the real SeaweedFS endpoint that fails the requests a test chooses."""
    proxy = HttpFaultProxy(s3_server.endpoint_url)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("fault", ["drop", 503, 500])
def test_a_transient_failure_is_retried_by_botocores_standard_mode(s3, s3_faults, fault, caplog):
    """Two failed attempts (connection cut mid-request, 503 SlowDown, 500), then S3 answers: the call succeeds
    on its third attempt, made by botocore's retry handler (no backoff loop of ours)."""
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=3))
    assert storage.client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    key = f"{s3.test_prefix}edits/transient-{fault}/output-0.png"
    failing = {"left": 2}

    def first_two(method, path, n):
        if method == "PUT" and path.split("?")[0].endswith(key) and failing["left"] > 0:
            failing["left"] -= 1
            return fault
        return None

    s3_faults.fault = first_two
    caplog.set_level(logging.WARNING, logger="service.storage")
    storage.put_bytes(key, b"\x89PNG transient", "image/png")
    expected = "dropped" if fault == "drop" else str(fault)
    assert [outcome for _, outcome in s3_faults.requests("PUT", key)] == [expected, expected, "200"]
    assert any("needed 3 attempts" in r.message for r in caplog.records)
    assert Storage(s3_settings(s3)).get_bytes(key) == b"\x89PNG transient"  # really stored, straight from S3


def test_a_persistent_failure_fails_cleanly_after_max_attempts(s3, s3_faults):
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=3))
    key = f"{s3.test_prefix}edits/persistent/output-0.png"
    s3_faults.fault = lambda method, path, n: "drop" if method == "PUT" else None
    with pytest.raises(StorageError, match=r"upload of s3://.*persistent/output-0.png failed after 3 attempt\(s\)"):
        storage.put_bytes(key, b"data")
    assert [outcome for _, outcome in s3_faults.requests("PUT", key)] == ["dropped"] * 3
    s3_faults.fault = lambda method, path, n: 503
    with pytest.raises(StorageError, match="after 3 attempt"):
        storage.get_bytes(key)
    assert len(s3_faults.requests("GET", key)) == 3


def test_a_client_error_is_not_retried(s3, s3_faults):
    """404 (a missing key) and 403 (bad credentials) are answers, not outages: one attempt each."""
    storage = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=5))
    missing = f"{s3.test_prefix}edits/none/output-0.png"
    with pytest.raises(StorageError, match="after 1 attempt"):
        storage.get_bytes(missing)
    assert [outcome for _, outcome in s3_faults.requests("GET", missing)] == ["404"]
    forged = Storage(s3_settings(s3, endpoint_url=s3_faults.url, max_attempts=5, secret_access_key="wrong"))
    with pytest.raises(StorageError, match="after 1 attempt"):
        forged.put_bytes(f"{s3.test_prefix}edits/forged/output-0.png", b"data")
    assert [o for _, o in s3_faults.requests("PUT", "forged/output-0.png")] == ["403"]


def test_a_dead_endpoint_fails_cleanly_and_readiness_says_so():
    dead = f"http://127.0.0.1:{free_port()}"
    storage = Storage(S3Settings(endpoint_url=dead, max_attempts=2))
    with pytest.raises(StorageError, match="after 2 attempt"):
        storage.put_bytes("edits/x/input.png", b"data")
    with pytest.raises(StorageError, match="unreachable"):
        storage.head_bucket()


def test_bucket_and_lifecycle_are_ensured_or_tolerated(s3, caplog):
    storage = Storage(s3_settings(s3, bucket=f"lifecycle-{int(time.time() * 1000)}"))
    caplog.set_level(logging.WARNING, logger="service.storage")
    storage.ensure_bucket_and_lifecycle()  # creates the bucket; lifecycle applied or logged
    storage.head_bucket()
    storage.ensure_bucket_and_lifecycle()  # idempotent
    try:
        rules = storage.client.get_bucket_lifecycle_configuration(Bucket=storage.bucket)["Rules"]
        assert rules[0]["Expiration"]["Days"] == 7 and rules[0]["Filter"]["Prefix"] == "edits/"
    except Exception:
        assert any("lifecycle" in r.message for r in caplog.records)
