"""Access control end to end: API keys stored only as hashes, revocation, tenant isolation (404, never 403,
for another tenant's edit), admin separated from tenants, presigned URLs that really expire."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from gateway_support import make_settings, s3_settings
from rq import Queue

from service.app import create_app
from service.storage import Storage

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"], "steps": 4}
ADMIN_TOKEN = "admin-secret-token-for-access-tests"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def conn(redis_url):
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def app(redis_url, s3):
    settings = make_settings(redis_url, s3, auth={"required": True, "admin_token": ADMIN_TOKEN},
                             webhooks={"allow_hosts": ["127.0.0.1"]})
    return create_app(settings, prepare_bucket=False)


@pytest.fixture
def client(app):
    return TestClient(app)


def new_key(client, tenant: str) -> tuple[str, str, dict[str, str]]:
    created = client.post("/v1/admin/keys", json={"tenant": tenant}, headers=ADMIN)
    assert created.status_code == 201, created.text
    body = created.json()
    return body["key"], body["key_id"], {"Authorization": f"Bearer {body['key']}"}


def every_redis_value(conn) -> list[bytes]:
    """Every key name and every stored value, whatever the type."""
    out: list[bytes] = []
    for key in conn.scan_iter("*"):
        out.append(key)
        kind = conn.type(key).decode()
        if kind == "string":
            out.append(conn.get(key) or b"")
        elif kind == "hash":
            for field, value in conn.hgetall(key).items():
                out += [field, value]
        elif kind == "list":
            out += conn.lrange(key, 0, -1)
        elif kind == "set":
            out += list(conn.smembers(key))
        elif kind == "zset":
            out += [m for m, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in conn.xrange(key):
                for field, value in fields.items():
                    out += [field, value]
    return out


def test_only_hashes_of_api_keys_are_stored(client, app, conn):
    key, _, acme = new_key(client, "acme")
    revoked_key, revoked_id, _ = new_key(client, "acme")
    assert client.delete(f"/v1/admin/keys/{revoked_id}", headers=ADMIN).status_code == 204
    body = dict(P2P, webhook={"url": "http://127.0.0.1:9/hook"})
    edit = client.post("/v1/edits", json=body, headers=acme).json()
    app.state.services.jobstore.mark_processing(edit["id"], batch_id="b", batch_size=1, worker="w")  # a webhook
    assert client.get(f"/v1/edits/{edit['id']}", headers=acme).status_code == 200
    dump = b"\n".join(every_redis_value(conn))
    assert len(dump) > 1000  # the scan saw the records
    for secret in (key, revoked_key, ADMIN_TOKEN):
        assert secret.encode() not in dump
        assert secret.removeprefix("esk_").encode() not in dump


def test_revoked_and_unknown_keys_are_401_everywhere(client):
    _, key_id, acme = new_key(client, "acme")
    edit = client.post("/v1/edits", json=P2P, headers=acme).json()
    assert client.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN).status_code == 204
    routes = [("GET", "/v1/edits"), ("POST", "/v1/edits"), ("GET", f"/v1/edits/{edit['id']}"),
              ("POST", f"/v1/edits/{edit['id']}/cancel"), ("GET", f"/v1/edits/{edit['id']}/events")]
    for headers in (acme, {"Authorization": "Bearer esk_" + "A" * 43}, {"Authorization": "Bearer "}, {}):
        for method, path in routes:
            response = client.request(method, path, headers=headers, json=P2P if method == "POST" else None)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer" and response.json()["error"]["message"]


def test_another_tenants_edit_is_indistinguishable_from_a_missing_one(client, app):
    _, _, acme = new_key(client, "acme")
    _, _, globex = new_key(client, "globex")
    mine = client.post("/v1/edits", json=P2P, headers=acme).json()["id"]
    missing = "0" * 26
    for method, suffix in [("GET", ""), ("POST", "/cancel"), ("GET", "/events")]:
        foreign = client.request(method, f"/v1/edits/{mine}{suffix}", headers=globex)
        unknown = client.request(method, f"/v1/edits/{missing}{suffix}", headers=globex)
        assert foreign.status_code == unknown.status_code == 404
        assert foreign.json()["error"]["type"] == unknown.json()["error"]["type"] == "not_found"
        assert foreign.json()["error"]["message"].replace(mine, "ID") == \
            unknown.json()["error"]["message"].replace(missing, "ID")
    assert client.get("/v1/edits", headers=globex).json()["data"] == []
    assert [e["id"] for e in client.get("/v1/edits", headers=acme).json()["data"]] == [mine]
    assert client.get(f"/v1/edits/{mine}", headers=acme).json()["status"] == "queued"  # the cancel did nothing
    # Idempotency keys are per tenant: the same key from another tenant is a different edit.
    first = client.post("/v1/edits", json=P2P, headers={**acme, "Idempotency-Key": "k1"}).json()["id"]
    other = client.post("/v1/edits", json=P2P, headers={**globex, "Idempotency-Key": "k1"})
    assert other.status_code == 202 and other.json()["id"] != first


def test_webhooks_of_an_edit_are_sent_for_its_tenant(client, app, conn):
    _, _, acme = new_key(client, "acme")
    edit = client.post("/v1/edits", json=dict(P2P, webhook={"url": "http://127.0.0.1:9/hook"}), headers=acme).json()
    app.state.services.jobstore.mark_processing(edit["id"], batch_id="b", batch_size=1, worker="w")
    jobs = Queue("webhooks", connection=conn).get_jobs()
    assert jobs and all(job.args[0]["tenant"] == "acme" and job.args[0]["edit_id"] == edit["id"] for job in jobs)


def test_admin_token_and_tenant_keys_are_not_interchangeable(client):
    _, key_id, acme = new_key(client, "acme")
    admin_routes = [("GET", "/v1/admin/keys", None), ("POST", "/v1/admin/keys", {"tenant": "x"}),
                    ("DELETE", f"/v1/admin/keys/{key_id}", None), ("GET", "/v1/admin/tenants/acme/limits", None),
                    ("PUT", "/v1/admin/tenants/acme/limits", {"rps": 0})]
    for method, path, body in admin_routes:
        for headers in (acme, {}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
            response = client.request(method, path, headers=headers, json=body)
            assert response.status_code == 401, (method, path, response.text)
    assert client.get("/v1/edits", headers=ADMIN).status_code == 401  # the admin is no tenant
    assert client.get("/v1/admin/keys", headers=ADMIN).status_code == 200


def test_presigned_urls_stop_working_when_they_expire(s3, monkeypatch):
    import botocore.auth

    storage = Storage(s3_settings(s3, presign_expiry_seconds=2))
    key = f"{s3.test_prefix}edits/expiring/output-0.png"
    storage.put_bytes(key, b"result", "image/png")
    url, expires_at = storage.presign_get(key)
    assert -1 < expires_at.timestamp() - time.time() <= 2  # expires_at is rounded down to the second
    fresh = httpx.get(url)
    assert fresh.status_code == 200 and fresh.content == b"result", fresh.text
    # the same 2 s URL as handed out 30 s ago: the signer's clock is set back instead of sleeping
    real = botocore.auth.get_current_datetime
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **kw: real(*a, **kw) - timedelta(seconds=30))
    url, _ = storage.presign_get(key)
    expired = httpx.get(url)
    assert expired.status_code == 403 and b"result" not in expired.content
    assert httpx.get(url.split("?")[0]).status_code == 403  # and the object is not public without a signature
