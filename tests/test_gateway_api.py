"""The gateway over real HTTP (uvicorn on a free port), with real Redis and S3.

Status changes are driven through JobStore's worker-side methods from the test, as a worker would.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
from fastapi.testclient import TestClient
from gateway_support import (  # noqa: F401  (fixtures)
    edit_queue_lengths,
    gateway_app,
    gateway_settings,
    live,
    make_settings,
    rconn,
    store,
)
from rq import Queue
from rq.job import Job

from editserve.contract import EditStatus
from service.app import create_app
from devtools.devstack import free_port
from service.storage import output_key

P2P = {"kind": "p2p", "source_prompt": "a cat riding a bike", "target_prompts": ["a dog riding a bike"],
       "steps": 4}
ADMIN = {"Authorization": "Bearer admin-secret-token"}


def submit(client: httpx.Client, body=None, **kw) -> dict:
    response = client.post("/v1/edits", json=body or P2P, **kw)
    assert response.status_code == 202, response.text
    return response.json()


def finish(store, edit_id: str, *, delay: float = 0.0, key: str | None = None, steps: int = 4):
    time.sleep(delay)
    store.mark_processing(edit_id, batch_id="batch-1", batch_size=1, worker="test-worker")
    for step in range(1, steps + 1):
        store.set_progress(edit_id, step, steps)
        time.sleep(0.01)
    results = [{"index": 0, "label": "a dog riding a bike", "key": key or output_key(edit_id, 0), "width": 128,
                "height": 128, "seed": 1}]
    store.mark_succeeded(edit_id, results=results, attention_maps=[], run_seconds=0.2)


def in_background(fn, *args, **kwargs) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------- basics

def test_submit_get_and_unknown_ids(live):
    with live.client() as client:
        edit = submit(client)
        got = client.get(f"/v1/edits/{edit['id']}")
        assert got.status_code == 200 and got.json()["id"] == edit["id"]
        assert got.json()["queue_position"] == 0
        missing = client.get("/v1/edits/doesnotexist")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 200
        models = client.get("/v1/models").json()["data"]
        assert {"tiny-sd", "tiny-ip2p"} <= {m["name"] for m in models}


def test_presigned_result_urls_work(live, store, s3):
    with live.client() as client:
        edit = submit(client)
        key = f"{s3.test_prefix}edits/{edit['id']}/output-0.png"
        store.storage.put_bytes(key, b"result-bytes", "image/png")
        finish(store, edit["id"], key=key)
        done = client.get(f"/v1/edits/{edit['id']}").json()
        assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "total": 4}
        result = done["results"][0]
        assert result["expires_at"] and httpx.get(result["url"]).content == b"result-bytes"
        assert done["metrics"]["batch_id"] == "batch-1" and done["metrics"]["attempts"] == 1


# ---------------------------------------------------------------------------------------------- Prefer: wait

def test_prefer_wait_returns_200_when_the_edit_finishes(live, store):
    with live.client() as client:
        edit = submit(client)
        # a second request waits on the same edit via its idempotency replay
        key_body = dict(P2P, metadata={"n": "1"})
        first = client.post("/v1/edits", json=key_body, headers={"Idempotency-Key": "wait-1"}).json()
        in_background(finish, store, first["id"], delay=0.5)
        started = time.monotonic()
        response = client.post("/v1/edits", json=key_body,
                               headers={"Idempotency-Key": "wait-1", "Prefer": "respond-async, wait=10"})
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 9  # answered at the finish (0.5 s), not at wait=10 (loose: loaded CI)
        assert response.json()["status"] == "succeeded" and response.json()["id"] == first["id"]
        assert response.headers["preference-applied"] == "wait=10"
        assert response.headers["idempotent-replayed"] == "true"
        assert edit["id"] != first["id"]


def test_prefer_wait_times_out_with_202_and_is_capped(live, gateway_settings):
    with live.client() as client:
        started = time.monotonic()
        response = client.post("/v1/edits", json=P2P, headers={"Prefer": "wait=1"})
        # held for wait=1, not for the 60 s cap (the upper bound is loose: one POST on a loaded CI box is slow)
        assert response.status_code == 202 and 0.9 < time.monotonic() - started < 30
        assert response.headers["preference-applied"] == "wait=1"
        capped = client.post("/v1/edits", json=P2P, headers={"Prefer": "wait=0, handling=lenient"})
        assert capped.headers["preference-applied"] == "wait=0"
    cap = gateway_settings.limits.max_wait_seconds
    from service.streams import parse_prefer, wait_seconds

    assert wait_seconds(["respond-async", "wait=100000"], cap) == cap
    assert parse_prefer(['respond-async; foo=bar, wait="5"']) == {"respond-async": None, "wait": "5"}
    assert wait_seconds(["wait=soon"], cap) is None


# ---------------------------------------------------------------------------------------------- idempotency

def test_idempotency_same_body_same_edit_and_conflict_on_different_body(live, rconn):
    with live.client() as client:
        headers = {"Idempotency-Key": "order-42"}
        first = client.post("/v1/edits", json=P2P, headers=headers)
        second = client.post("/v1/edits", json=P2P, headers=headers)
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"]
        assert second.headers["idempotent-replayed"] == "true"
        conflict = client.post("/v1/edits", json=dict(P2P, steps=5), headers=headers)
        assert conflict.status_code == 409
        assert conflict.json()["error"]["type"] == "idempotency_conflict"
        assert "different request body" in conflict.json()["error"]["message"]
        assert edit_queue_lengths(rconn) == 1


def test_concurrent_duplicate_requests_run_once(live, rconn, s3):
    from gateway_support import png

    files = {"image": ("in.png", png(64, 64), "image/png")}
    request = json.dumps({"kind": "ip2p", "instruction": "make it snow", "steps": 2})
    barrier = threading.Barrier(6)
    responses = []

    def post():
        with live.client() as client:
            barrier.wait()
            responses.append(client.post("/v1/edits", data={"request": request}, files=files,
                                         headers={"Idempotency-Key": "dup"}))

    threads = [in_background(post) for _ in range(6)]
    [t.join(30) for t in threads]
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert edit_queue_lengths(rconn) == 1
    edit_id = responses[0].json()["id"]
    stored = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="edits/")["Contents"]
    inputs = [o["Key"] for o in stored if o["Key"].endswith("/input.png")]
    assert f"edits/{edit_id}/input.png" in inputs


# ---------------------------------------------------------------------------------------------- listing

def test_listing_paginates_and_filters(live, store):
    with live.client() as client:
        ids = [submit(client)["id"] for _ in range(5)]
        store.mark_failed(ids[1], __import__("editserve.contract").contract.ErrorInfo(type="x", message="y"))
        seen, cursor = [], None
        while True:
            page = client.get("/v1/edits", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [e["id"] for e in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == ids[::-1]
        failed = client.get("/v1/edits", params={"status": "failed"}).json()["data"]
        assert [e["id"] for e in failed] == [ids[1]]
        assert client.get("/v1/edits", params={"kind": "ip2p"}).json()["data"] == []
        assert len(client.get("/v1/edits", params={"model": "tiny-sd"}).json()["data"]) == 5


# ---------------------------------------------------------------------------------------------- tenants

def test_tenant_isolation_and_key_lifecycle(live):
    with live.client() as client:
        key_a = client.post("/v1/admin/keys", json={"tenant": "acme"}, headers=ADMIN)
        assert key_a.status_code == 201 and key_a.json()["webhook_secret"].startswith("whsec_")
        key_b = client.post("/v1/admin/keys", json={"tenant": "globex", "label": "ci"}, headers=ADMIN).json()
        a = {"Authorization": f"Bearer {key_a.json()['key']}"}
        b = {"Authorization": f"Bearer {key_b['key']}"}
        edit = submit(client, headers=a)
        assert client.get(f"/v1/edits/{edit['id']}", headers=a).status_code == 200
        for method, path in [("GET", f"/v1/edits/{edit['id']}"), ("POST", f"/v1/edits/{edit['id']}/cancel"),
                             ("GET", f"/v1/edits/{edit['id']}/events")]:
            assert client.request(method, path, headers=b).status_code == 404
            assert client.request(method, path).status_code == 404  # anonymous = default tenant
        assert client.get("/v1/edits", headers=b).json()["data"] == []
        assert client.get("/v1/edits", headers={"Authorization": "Bearer esk_wrong"}).status_code == 401
        assert client.get("/v1/edits", headers={"Authorization": "Basic abc"}).status_code == 401
        listed = client.get("/v1/admin/keys", headers=ADMIN).json()["data"]
        assert {k["tenant"] for k in listed} == {"acme", "globex"} and all("key" not in k for k in listed)
        assert client.get("/v1/admin/keys", headers=a).status_code == 401
        revoked = client.delete(f"/v1/admin/keys/{key_a.json()['key_id']}", headers=ADMIN)
        assert revoked.status_code == 204
        assert client.get(f"/v1/edits/{edit['id']}", headers=a).status_code == 401
        assert client.delete(f"/v1/admin/keys/{key_a.json()['key_id']}", headers=ADMIN).status_code == 404
        bad_tenant = client.post("/v1/admin/keys", json={"tenant": "no spaces"}, headers=ADMIN)
        assert bad_tenant.status_code == 422 and bad_tenant.json()["error"]["field"] == "tenant"


def test_auth_required_and_admin_disabled(redis_url, s3):
    app = create_app(make_settings(redis_url, s3, auth={"required": True}), prepare_bucket=False)
    with TestClient(app) as client:
        response = client.get("/v1/edits")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        disabled = client.post("/v1/admin/keys", json={"tenant": "x"}, headers=ADMIN)
        assert disabled.status_code == 404 and "disabled" in disabled.json()["error"]["message"]
        key = app.state.services.keys.create_key("acme").key
        assert client.get("/v1/edits", headers={"Authorization": f"Bearer {key}"}).status_code == 200


# ---------------------------------------------------------------------------------------------- cancel

def test_cancel_queued_removes_the_job_and_cancel_twice_is_idempotent(live, store, rconn):
    with live.client() as client:
        edit = submit(client)
        job = Job.fetch(edit["id"], connection=rconn)
        assert edit["id"] in Queue(job.origin, connection=rconn).get_job_ids()
        canceled = client.post(f"/v1/edits/{edit['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert Queue(job.origin, connection=rconn).get_job_ids() == []
        again = client.post(f"/v1/edits/{edit['id']}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "canceled"
        assert store.mark_processing(edit["id"], batch_id="b", batch_size=1, worker="w") is False

        running = submit(client)
        store.mark_processing(running["id"], batch_id="b", batch_size=1, worker="w")
        flagged = client.post(f"/v1/edits/{running['id']}/cancel").json()
        assert flagged["status"] == "processing" and flagged["cancel_requested"] is True
        assert store.is_cancel_requested(running["id"])
        store.mark_canceled(running["id"])
        assert client.get(f"/v1/edits/{running['id']}").json()["status"] == "canceled"


# ---------------------------------------------------------------------------------------------- SSE

def parse_sse(lines) -> list[tuple[str, dict]]:
    events, event, data = [], None, []
    for line in lines:
        if line.startswith(":"):
            events.append(("comment", {}))
        elif line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data.append(line.split(":", 1)[1].strip())
        elif line == "" and event:
            events.append((event, json.loads("".join(data))))
            event, data = None, []
    return events


def test_sse_streams_changes_in_order_and_ends_after_terminal(live, store):
    with live.client() as client:
        edit = submit(client)
        in_background(finish, store, edit["id"], delay=0.8, steps=4)
        with client.stream("GET", f"/v1/edits/{edit['id']}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(response.iter_lines())
    assert ("comment", {}) in events  # keep-alive while idle
    frames = [(name, data) for name, data in events if name != "comment"]
    statuses = [data["status"] for name, data in frames if name == "status"]
    assert statuses == ["queued", "processing", "succeeded"]
    revisions = [data["revision"] for _, data in frames]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    progress = [data["progress"]["step"] for name, data in frames if name == "progress"]
    assert progress == sorted(progress) and progress
    assert frames[-1][1]["results"][0]["url"].startswith("http")


def test_sse_of_a_terminal_edit_sends_one_event(live, store):
    with live.client() as client:
        edit = submit(client)
        client.post(f"/v1/edits/{edit['id']}/cancel")
        with client.stream("GET", f"/v1/edits/{edit['id']}/events") as response:
            events = parse_sse(response.iter_lines())
    assert [(n, d["status"]) for n, d in events] == [("status", "canceled")]


# ---------------------------------------------------------------------------------------------- ops

def test_metrics_use_route_templates_and_report_queue_depth(live):
    with live.client() as client:
        edit = submit(client)
        client.get(f"/v1/edits/{edit['id']}")
        text = client.get("/metrics").text
    assert 'editserve_http_requests_total{code="200",method="GET",route="/v1/edits/{edit_id}"}' in text
    assert edit["id"] not in text
    assert 'editserve_jobs_submitted_total{kind="p2p",model="tiny-sd"}' in text
    depth = [line for line in text.splitlines() if line.startswith("editserve_queue_depth{")]
    assert depth and depth[0].endswith(" 1.0") and 'model="tiny-sd"' in depth[0] and 'priority="normal"' in depth[0]
    assert "128x128" not in text  # the queue label is bounded: model and priority, never the batch key
    assert [line for line in text.splitlines() if line.startswith("editserve_running_edits{")] == [
        'editserve_running_edits{model="tiny-sd"} 0.0']
    assert 'editserve_live_workers{model="tiny-sd"} 0.0' in text  # queued work and no worker: the alert's case
    for name in ("editserve_batch_size histogram", "editserve_queue_wait_seconds histogram",  # labelled: no
                 "editserve_job_duration_seconds histogram", "editserve_denoise_step_seconds histogram",  # sample yet
                 "editserve_jobs_in_progress gauge", "editserve_http_request_duration_seconds histogram"):
        assert f"# TYPE {name}" in text, name


def test_metrics_multiprocess_mode(tmp_path):
    import subprocess
    import sys

    code = (
        "from service import metrics\n"
        "metrics.jobs_submitted_total.labels(kind='p2p', model='m').inc(3)\n"
        "metrics.jobs_in_progress.inc()\n"
        "body, _ = metrics.render()\n"
        "print(body.decode())\n"
    )
    env = {**__import__("os").environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'editserve_jobs_submitted_total{kind="p2p",model="m"} 3.0' in out.stdout
    assert "editserve_jobs_in_progress 1.0" in out.stdout
    assert list(tmp_path.glob("*.db"))


def test_readyz_reports_s3_down(redis_url):
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(redis_url, s3={"endpoint_url": dead})
    with TestClient(create_app(settings, prepare_bucket=False)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["error"]["type"] == "not_ready" and "s3" in body["error"]["message"]
    assert body["checks"]["redis"] == "ok" and body["checks"]["s3"].startswith("down")


def test_readyz_reports_redis_down(s3):
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", s3)
    with TestClient(create_app(settings, prepare_bucket=False)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503 and "redis" in response.json()["error"]["message"]
        unavailable = client.get("/v1/edits/x")
        assert unavailable.status_code == 503 and unavailable.json()["error"]["type"] == "queue_unavailable"


def test_unexpected_errors_are_500_with_the_error_shape(redis_url, s3, monkeypatch):
    app = create_app(make_settings(redis_url, s3), prepare_bucket=False)
    monkeypatch.setattr(app.state.services.jobstore, "get", lambda *a, **k: 1 / 0)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/edits/anything")
    assert response.status_code == 500 and response.json()["error"]["type"] == "internal_error"


def test_status_enum_matches_contract():
    assert {s.value for s in EditStatus} == {"queued", "processing", "succeeded", "failed", "canceled"}


def test_admin_cli_creates_lists_and_revokes_keys(redis_url, rconn):
    import os
    import subprocess
    import sys

    from service.auth import KeyStore

    env = {**os.environ, "EDITSERVE_REDIS_URL": redis_url}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "service.admin", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    created = cli("create-key", "--tenant", "acme", "--label", "ops")
    assert created.returncode == 0, created.stderr
    fields = dict(line.split(": ", 1) for line in created.stdout.splitlines())
    assert fields["api_key"].startswith("esk_") and fields["webhook_secret"].startswith("whsec_")
    store = KeyStore(rconn, make_settings(redis_url))
    assert store.tenant_for_key(fields["api_key"]) == "acme"
    assert fields["api_key"] not in str(list(rconn.scan_iter("*"))), "keys must be stored only as hashes"
    listed = cli("list-keys")
    assert fields["key_id"] in listed.stdout and fields["api_key"] not in listed.stdout
    assert cli("revoke-key", fields["key_id"]).returncode == 0
    assert store.tenant_for_key(fields["api_key"]) is None
    assert cli("revoke-key", fields["key_id"]).returncode == 1
    assert cli("create-key", "--tenant", "bad tenant").returncode == 2
