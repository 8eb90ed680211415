"""The SDK (editserve/client.py) and CLI (editserve/cli.py).

Part 1 runs them against the real gateway (service/app.py under uvicorn, real Redis, real S3): a thread plays
the GPU worker through JobStore (mark_processing → set_progress → upload → mark_succeeded), so waiting, SSE,
presigned downloads, idempotent retries and error mapping cross real HTTP. Part 2 pins retry/backoff and
parsing details with httpx.MockTransport, where a real server cannot misbehave on cue.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import redis as redis_lib
from gateway_support import make_settings, png, start_live_server

import editserve
from editserve import cli, errors
from editserve.client import AsyncClient, Client, _SSEDecoder
from editserve.contract import Edit, EditStatus, ErrorInfo, ModelInfo
from editserve.progress import ProgressLine, label, render

# ============================================================================================ real gateway

@pytest.fixture
def gateway(redis_url, s3):
    from service.app import create_app

    settings = make_settings(redis_url, s3)
    app = create_app(settings, prepare_bucket=False)
    app.state.services.sse_keepalive_seconds = 0.3
    server = start_live_server(app)
    yield server
    server.stop()


@pytest.fixture
def services(gateway):
    return gateway.app.state.services


@pytest.fixture
def client(gateway):
    with Client(gateway.url, timeout=10) as c:
        yield c


def edit_records(services) -> int:
    return sum(1 for _ in services.redis.scan_iter("editserve:edit:*"))


class FakeWorker(threading.Thread):
    """Plays the GPU worker for one edit through the real JobStore and S3."""

    def __init__(self, services, edit_id: str, *, steps: int = 4, fail: ErrorInfo | None = None,
                 maps: bool = False, step_seconds: float = 0.05, start_delay: float = 0.1):
        super().__init__(daemon=True)
        self.services, self.edit_id, self.steps, self.fail, self.maps = services, edit_id, steps, fail, maps
        self.step_seconds, self.start_delay = step_seconds, start_delay
        self.output = png(64, 64, (10, 200, 30))
        self.error: BaseException | None = None

    def run(self):
        try:
            store, storage, edit_id = self.services.jobstore, self.services.storage, self.edit_id
            time.sleep(self.start_delay)
            assert store.mark_processing(edit_id, batch_id="b1", batch_size=1, worker="fake")
            for step in range(1, self.steps + 1):
                time.sleep(self.step_seconds)
                store.set_progress(edit_id, step, self.steps)
            if self.fail is not None:
                store.mark_failed(edit_id, self.fail)
                return
            storage.put_bytes(f"edits/{edit_id}/output-0.png", self.output, "image/png")
            maps = []
            if self.maps:
                storage.put_bytes(f"edits/{edit_id}/attn-0.png", png(32, 32), "image/png")
                storage.put_bytes(f"edits/{edit_id}/attn-0.npy", b"\x93NUMPY fake", "application/octet-stream")
                maps = [{"prompt_index": 0, "prompt": "a cat", "tokens": ["a", "cat"],
                         "grid_key": f"edits/{edit_id}/attn-0.png", "array_key": f"edits/{edit_id}/attn-0.npy"}]
            results = [{"index": 0, "label": "a dog", "key": f"edits/{edit_id}/output-0.png", "width": 64,
                        "height": 64, "seed": 7}]
            store.mark_succeeded(edit_id, results=results, attention_maps=maps, run_seconds=0.2)
        except BaseException as exc:  # noqa: BLE001 — surfaced by the test
            self.error = exc


def test_p2p_submit_wait_with_progress_and_download(client, services, tmp_path):
    edit = client.submit_p2p("a cat on a mat", "a dog on a mat", seed=7, steps=4, attention_maps=True,
                             metadata={"run": "sdk"})
    assert isinstance(edit, Edit) and edit.status is EditStatus.queued and edit.kind == "p2p"
    assert edit.params["seed"] == 7 and edit.metadata == {"run": "sdk"}
    worker = FakeWorker(services, edit.id, maps=True)
    worker.start()
    seen: list[Edit] = []
    done = client.wait(edit.id, timeout=20, progress=seen.append)
    worker.join(5)
    assert worker.error is None
    assert done.status is EditStatus.succeeded and done.results[0].url.startswith("http")
    statuses = [e.status for e in seen]
    assert EditStatus.processing in statuses and statuses[-1] is EditStatus.succeeded
    assert any(e.progress and 0 < e.progress.step < e.progress.total for e in seen), "no progress seen"

    paths = client.download(done, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == [f"{edit.id}-attn-0.npy", f"{edit.id}-attn-0.png", f"{edit.id}-output-0.png"]
    assert (tmp_path / "out" / f"{edit.id}-output-0.png").read_bytes() == worker.output
    assert client.download(edit.id, tmp_path / "only", attention_maps=False) == [
        tmp_path / "only" / f"{edit.id}-output-0.png"]


def test_ip2p_multipart_from_path_bytes_and_pil(client, services, tmp_path):
    from PIL import Image

    source = tmp_path / "cat.png"
    source.write_bytes(png(96, 64))
    by_path = client.submit_ip2p(source, "make it a watercolor", image_guidance=1.2, seed=3)
    by_bytes = client.submit_ip2p(source.read_bytes(), "make it a watercolor")
    by_pil = client.submit_ip2p(Image.new("RGB", (80, 80), "blue"), "make it red",
                                sweep={"image_guidance": [1, 1.5], "seeds": [1, 2]})
    for edit in (by_path, by_bytes, by_pil):
        assert edit.kind == "ip2p" and edit.status is EditStatus.queued
    assert by_path.params["image_guidance"] == 1.2
    assert by_pil.params["sweep"]["image_guidance"] == [1, 1.5]
    assert services.storage.get_bytes(f"edits/{by_path.id}/input.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_stream_yields_states_until_terminal_and_prefer_wait(client, services):
    edit = client.submit_p2p("a cat", "a dog", steps=3)
    FakeWorker(services, edit.id, steps=3).start()
    states = list(client.stream(edit.id))
    assert states[0].status in (EditStatus.queued, EditStatus.processing)
    assert states[-1].status is EditStatus.succeeded
    assert [s.revision for s in states] == sorted(s.revision for s in states)

    second = client.submit_p2p("a cat", "a lion", steps=2)
    FakeWorker(services, second.id, steps=2).start()
    third = client.submit_p2p("a cat", "a tiger", steps=2)  # Prefer: wait on a fresh submit
    FakeWorker(services, third.id, steps=2, start_delay=0.0).start()
    assert client.wait(second.id, timeout=10, progress=False).status is EditStatus.succeeded
    assert client.wait(third, timeout=10, progress=False).status is EditStatus.succeeded


def test_submit_with_prefer_wait_returns_the_finished_edit(client, services, redis_url):
    conn = redis_lib.Redis.from_url(redis_url)
    holder: dict = {}

    def start_worker_when_queued():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ids = [k.decode().rsplit(":", 1)[1] for k in conn.scan_iter("editserve:edit:*")]
            if ids:
                holder["worker"] = FakeWorker(services, ids[0], steps=2, start_delay=0)
                holder["worker"].run()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=start_worker_when_queued, daemon=True)
    thread.start()
    edit = client.submit_p2p("a cat", "a dog", steps=2, wait=10)
    thread.join(10)
    assert edit.status is EditStatus.succeeded and edit.results


def test_failed_and_canceled_edits_raise_with_the_server_error(client, services):
    edit = client.submit_p2p("a cat", "a dog")
    FakeWorker(services, edit.id, fail=ErrorInfo(type="out_of_memory", message="CUDA out of memory")).start()
    with pytest.raises(errors.EditFailed) as failed:
        client.wait(edit.id, timeout=10, progress=False)
    assert failed.value.type == "out_of_memory" and "CUDA out of memory" in str(failed.value)
    assert failed.value.edit.status is EditStatus.failed

    queued = client.submit_p2p("a cat", "a bird")
    canceled = client.cancel(queued.id)
    assert canceled.status is EditStatus.canceled
    with pytest.raises(errors.EditCanceled):
        client.wait(queued.id, timeout=5, progress=False)
    again = client.cancel(queued.id)  # idempotent: the canceled edit, not a 409
    assert again.id == queued.id and again.status is EditStatus.canceled


def test_wait_timeout_carries_the_last_state(client):
    edit = client.submit_p2p("a cat", "a dog")
    started = time.monotonic()
    with pytest.raises(errors.WaitTimeout) as timeout:
        client.wait(edit.id, timeout=0.8, progress=False)
    assert time.monotonic() - started < 30  # gave up after its timeout (loose: a loaded CI box), not never
    assert timeout.value.edit is not None and timeout.value.edit.status is EditStatus.queued


def test_server_errors_map_to_typed_exceptions_with_field(client):
    with pytest.raises(errors.NotFoundError) as missing:
        client.get("0000000000000000000000000z")
    assert missing.value.status == 404 and missing.value.type == "not_found"

    with pytest.raises(errors.InvalidRequestError) as unknown_model:
        client.submit_p2p("a cat", "a dog", model="no-such-model")
    assert unknown_model.value.status == 422 and unknown_model.value.field == "model"

    with pytest.raises(errors.InvalidRequestError) as too_big:  # tiny-sd max_size is 256
        client.submit_p2p("a cat", "a dog", size=1024)
    assert too_big.value.status == 422 and too_big.value.field in ("height", "width")

    # Local validation (same contract) names the field before anything is sent.
    with pytest.raises(errors.InvalidRequestError) as local:
        client.submit_p2p("a cat", ["a dog"], reweight={"dog": 99})
    assert local.value.status is None and local.value.field == "reweight"
    with pytest.raises(errors.InvalidRequestError) as local_list:
        client.submit({"kind": "p2p", "source_prompt": "a", "target_prompts": []})
    assert local_list.value.field == "target_prompts"


def test_idempotent_retry_after_a_lost_response_creates_one_edit(gateway, services):
    """The first POST reaches the server but its response is lost; the retry replays the same key."""
    real = httpx.HTTPTransport()
    seen_keys: list[str] = []

    class LoseFirstResponse(httpx.BaseTransport):
        def handle_request(self, request):
            response = real.handle_request(request)
            if request.method == "POST" and request.url.path == "/v1/edits":
                seen_keys.append(request.headers["idempotency-key"])
                if len(seen_keys) == 1:
                    response.read()
                    response.close()
                    raise httpx.ReadError("connection reset", request=request)
            return response

    with Client(gateway.url, transport=LoseFirstResponse(), retries=2) as flaky:
        edit = flaky.submit_p2p("a cat", "a dog")
        assert len(seen_keys) == 2 and seen_keys[0] == seen_keys[1]
        assert edit_records(services) == 1 and flaky.get(edit.id).id == edit.id
        other = flaky.submit_p2p("a cat", "a dog")  # a new call gets a new key: a new edit
    assert other.id != edit.id and edit_records(services) == 2 and seen_keys[2] != seen_keys[0]


def test_list_pages_and_filters(client):
    ids = [client.submit_p2p("a cat", target).id for target in ("a dog", "a cow", "a pig")]
    page = client.list(limit=2)
    assert [e.id for e in page.data] == ids[::-1][:2] and page.next_cursor
    assert [e.id for e in client.iter_edits(limit=2)] == ids[::-1]
    client.cancel(ids[0])
    assert [e.id for e in client.list(status="canceled").data] == [ids[0]]
    assert [e.id for e in client.list(status=EditStatus.queued, kind="p2p").data] == ids[:0:-1]
    assert client.list(kind="ip2p").data == []


def test_models(client):
    models = client.models()
    assert all(isinstance(m, ModelInfo) for m in models)
    tiny = {m.name: m for m in models}["tiny-sd"]
    assert tiny.edit_kinds == ["p2p"] and tiny.random_weights


def test_api_key_auth(redis_url, s3):
    from service.app import create_app
    from service.auth import KeyStore

    settings = make_settings(redis_url, s3, auth={"required": True})
    app = create_app(settings, prepare_bucket=False)
    key = KeyStore(app.state.services.redis, settings).create_key("acme").key
    server = start_live_server(app)
    try:
        with Client(server.url, api_key=None) as anonymous, pytest.raises(errors.AuthenticationError) as denied:
            anonymous.list()
        assert denied.value.status == 401
        with Client(server.url, api_key="esk_wrong") as wrong, pytest.raises(errors.AuthenticationError):
            wrong.list()
        with Client(server.url, api_key=key) as good:
            edit = good.submit_p2p("a cat", "a dog")
            assert good.get(edit.id).id == edit.id
    finally:
        server.stop()


def test_async_client_end_to_end(gateway, services, tmp_path):
    async def scenario():
        async with AsyncClient(gateway.url, timeout=10) as client:
            edit = await client.submit_p2p("a cat", "a dog", steps=3)
            worker = FakeWorker(services, edit.id, steps=3)
            worker.start()
            seen = []
            done = await client.wait(edit.id, timeout=20, progress=seen.append)
            assert done.status is EditStatus.succeeded and seen[-1].status is EditStatus.succeeded
            paths = await client.download(done, tmp_path)
            assert paths[0].read_bytes() == worker.output
            assert (await client.get(edit.id)).id == edit.id
            assert [e.id async for e in client.iter_edits()] == [edit.id]
            assert any(m.name == "tiny-ip2p" for m in await client.models())
            with pytest.raises(errors.NotFoundError):
                await client.cancel("0000000000000000000000000z")
            ip2p = await client.submit_ip2p(png(), "make it snow")
            assert ip2p.kind == "ip2p"
            states = [s async for s in client.stream(edit.id)]
            assert states[-1].status is EditStatus.succeeded

    asyncio.run(scenario())


def test_progress_lines_name_each_followed_edit_uniquely(client, services, monkeypatch):
    """Several edits followed at once (a script, several terminals): each line says which edit it is. Ids begin
    with a millisecond timestamp, so edits of the same second share their first characters: the line shows the
    id's random tail, the kind and a prompt snippet."""
    import io
    import types

    from service import jobstore

    long_target = "a watercolor painting of a dog sitting on a red mat"
    p2p = client.submit({"kind": "p2p", "source_prompt": "a cat sitting on a red mat",
                         "target_prompts": [long_target, "a fox sitting on a red mat"], "edit": "refine"})
    ip2p = client.submit_ip2p(png(), "make it snowy")
    p2p, ip2p = client.get(p2p.id), client.get(ip2p.id)
    assert label(p2p) == f'{p2p.id[-8:]} p2p "a watercolor painting o…" +1'
    assert label(ip2p) == f'{ip2p.id[-8:]} ip2p "make it snowy"'
    assert label(ip2p, full_id=True) == f'{ip2p.id} ip2p "make it snowy"'

    with monkeypatch.context() as frozen:  # two ids minted in the same millisecond, as a burst of submits gets
        frozen.setattr(jobstore, "time", types.SimpleNamespace(time=lambda: 1_800_000_000.0))
        first, second = jobstore.new_edit_id(), jobstore.new_edit_id()
    assert first[:12] == second[:12] and first != second
    twins = [p2p.model_copy(update={"id": ident}) for ident in (first, second)]  # same prompts too
    lines = [render(edit, 1.0) for edit in twins]
    assert lines[0] != lines[1] and lines[0].startswith(first[-8:]) and lines[1].startswith(second[-8:])

    stream = io.StringIO()
    bar = ProgressLine(stream, enabled=True)
    for edit in (p2p, ip2p):
        bar(edit)
    drawn = stream.getvalue()
    assert f'{p2p.id[-8:]} p2p "a watercolor' in drawn and f'{ip2p.id[-8:]} ip2p "make it snowy"' in drawn


def test_cli_edit_get_cancel_models(gateway, services, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDITSERVE_URL", gateway.url)

    # Submit with --no-wait, then play the worker and `editserve wait` for the images.
    assert cli.main(["edit", "p2p", "--source", "a cat", "--target", "a dog", "--mode", "reweight",
                     "--reweight", "dog=2", "--cross", "0.7", "--self", "0.3", "--steps", "3", "--seed", "5",
                     "--size", "128", "--maps", "--negative", "blurry", "--scheduler", "unipc", "--no-wait"]) == 0
    edit_id = capsys.readouterr().out.strip()
    request = services.jobstore.load_payload(edit_id).request
    assert request.reweight == {"dog": 2.0} and request.cross_replace_steps == 0.7 and request.height == 128
    assert request.negative_prompt == "blurry" and request.scheduler == "unipc"
    worker = FakeWorker(services, edit_id, steps=3)
    worker.start()
    assert cli.main(["wait", edit_id, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / f"{edit_id}-output-0.png")]
    assert "saved 1 file(s)" in err and f'{edit_id} p2p "a dog" succeeded' in err  # kind and prompt named

    # Full flow in one command, ip2p with a sweep.
    image = tmp_path / "in.png"
    image.write_bytes(png())
    thread = threading.Thread(target=lambda: _play_next_queued(services), daemon=True)
    thread.start()
    assert cli.main(["-q", "edit", "ip2p", "--image", str(image), "--instruction", "make it snow",
                     "--sweep-image", "1,1.5", "--sweep-seeds", "1,2", "--out", str(tmp_path / "ip2p")]) == 0
    thread.join(10)
    out, err = capsys.readouterr()
    assert len(out.split()) == 1 and err == ""

    assert cli.main(["get", edit_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
    assert cli.main(["edit", "p2p", "--source", "a", "--target", "b", "--no-wait"]) == 0
    queued = capsys.readouterr().out.strip()
    assert cli.main(["cancel", queued]) == 0 and f"{queued} canceled" in capsys.readouterr().out
    assert cli.main(["models"]) == 0 and "tiny-sd" in capsys.readouterr().out
    # the API's base URL (ending in /v1) works too, and -q may follow the subcommand
    assert cli.main(["--url", gateway.url + "/v1/", "models", "-q"]) == 0 and "tiny-sd" in capsys.readouterr().out
    assert cli.main(["edit", "p2p", "--source", "a", "--target", "b", "--no-wait", "-q"]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--status", "canceled"]) == 0 and queued in capsys.readouterr().out


def _play_next_queued(services):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for edit in services.jobstore.list("default", status="queued").data:
            if edit.kind == "ip2p":
                FakeWorker(services, edit.id, steps=2, start_delay=0).run()
                return
        time.sleep(0.05)


def test_cli_errors_name_the_field_and_exit_non_zero(gateway, tmp_path, capsys):
    url = ["--url", gateway.url]
    assert cli.main(url + ["edit", "p2p", "--source", "a", "--target", "b", "--model", "nope", "--out",
                           str(tmp_path)]) == cli.EXIT_REFUSED
    assert "model" in capsys.readouterr().err
    assert cli.main(url + ["edit", "p2p", "--source", "a", "--target", "b", "--cross", "2", "--out",
                           str(tmp_path)]) == 2  # caught locally
    err = capsys.readouterr().err
    assert err.count("cross_replace_steps") == 1 and "constrained" not in err and "float" not in err
    assert cli.main(url + ["edit", "p2p", "--source", "a", "--target", "b", "--reweight", "b=99", "--out",
                           str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("reweight") == 1
    image = tmp_path / "in.png"
    image.write_bytes(png())
    assert cli.main(url + ["edit", "ip2p", "--image", str(image), "--instruction", "x", "--sweep-image", "1,99",
                           "--out", str(tmp_path)]) == 2  # a part of the request validated alone: no traceback
    assert "sweep.image_guidance.1:" in capsys.readouterr().err
    assert cli.main(url + ["edit", "p2p", "--source", "a", "--target", "b"]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(url + ["edit", "ip2p", "--image", str(tmp_path / "missing.png"), "--instruction", "x",
                           "--out", str(tmp_path)]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert cli.main(url + ["get", "0000000000000000000000000z"]) == cli.EXIT_REFUSED
    assert "not_found" in capsys.readouterr().err
    assert cli.main(["--url", "http://127.0.0.1:9", "--retries", "0", "models"]) == cli.EXIT_UNREACHABLE
    assert "cannot reach the server" in capsys.readouterr().err
    codes = [cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_TIMEOUT, cli.EXIT_CANCELED, cli.EXIT_REFUSED,
             cli.EXIT_UNREACHABLE, cli.EXIT_LOCAL_IO, cli.EXIT_INTERRUPTED]
    assert len(set(codes)) == len(codes) and all(f"{code} " in cli.EXIT_CODES_HELP for code in codes)
    with pytest.raises(SystemExit) as usage:
        cli.main(["edit", "p2p", "--source", "a", "--target", "b", "--reweight", "oops"])
    assert usage.value.code == 2


# ============================================================================================ MockTransport

EDIT = {"id": "ed1", "object": "edit", "kind": "p2p", "model": "tiny-sd", "status": "queued",
        "created_at": "2026-01-01T00:00:00Z", "params": {}}


def edit_json(**changes) -> dict:
    return {**EDIT, **changes}


@pytest.fixture
def no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("editserve.client.time.sleep", slept.append)
    return slept


def test_retries_503_and_429_honouring_retry_after_with_one_idempotency_key(no_sleep):
    calls: list[httpx.Request] = []
    replies = [httpx.Response(503, headers={"Retry-After": "2"}, json={"error": {"type": "service_unavailable",
                                                                                  "message": "redis down"}}),
               httpx.Response(429, headers={"Retry-After": "1"}),
               httpx.Response(202, json=edit_json())]

    def handler(request):
        calls.append(request)
        return replies.pop(0)

    with Client("http://api.test", transport=httpx.MockTransport(handler), retries=3) as client:
        assert client.submit_p2p("a", "b").id == "ed1"
    assert no_sleep == [2.0, 1.0]
    assert len({r.headers["idempotency-key"] for r in calls}) == 1
    assert all(r.content == calls[0].content for r in calls)


def test_retries_exhausted_raise_the_typed_error(no_sleep):
    def handler(request):
        return httpx.Response(429, headers={"Retry-After": "120"},
                              json={"error": {"type": "queue_full", "message": "queue holds 10000", "field": None}})

    with Client("http://api.test", transport=httpx.MockTransport(handler), retries=1) as client:
        with pytest.raises(errors.RateLimitError) as info:
            client.get("ed1")
    assert info.value.status == 429 and info.value.type == "queue_full" and "10000" in info.value.message
    assert no_sleep == [60.0]  # Retry-After is capped


def test_connect_errors_are_retried_then_raised(no_sleep):
    attempts = []

    def handler(request):
        attempts.append(request)
        raise httpx.ConnectError("refused", request=request)

    with Client("http://api.test", transport=httpx.MockTransport(handler), retries=2) as client:
        with pytest.raises(errors.APIConnectionError):
            client.models()
    assert len(attempts) == 3 and len(no_sleep) == 2


def test_non_retryable_errors_are_not_retried_and_fastapi_detail_is_parsed(no_sleep):
    def handler(request):
        return httpx.Response(422, json={"detail": [{"loc": ["body", "p2p", "steps"], "msg": "too many",
                                                     "type": "less_than_equal"}]})

    with Client("http://api.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(errors.InvalidRequestError) as info:
            client.submit_p2p("a", "b")
    assert (info.value.field, info.value.message, no_sleep) == ("steps", "too many", [])
    assert "field: steps" in str(info.value)


def test_request_shape_auth_header_and_env(monkeypatch):
    seen: list[httpx.Request] = []

    def handler(request):
        seen.append(request)
        return httpx.Response(202, json=edit_json())

    monkeypatch.setenv("EDITSERVE_URL", "http://env.test/")
    monkeypatch.setenv("EDITSERVE_API_KEY", "esk_env")
    with Client(transport=httpx.MockTransport(handler)) as client:
        client.submit_p2p("a cat", ["a dog", "a cow"], seed=1, size=128, webhook="https://hooks.example/x",
                          wait=5)
    request = seen[0]
    assert str(request.url) == "http://env.test/v1/edits"
    assert request.headers["authorization"] == "Bearer esk_env" and request.headers["prefer"] == "wait=5"
    body = json.loads(request.content)
    assert body == {"kind": "p2p", "source_prompt": "a cat", "target_prompts": ["a dog", "a cow"], "seed": 1,
                    "height": 128, "width": 128, "webhook": {"url": "https://hooks.example/x"}}


def test_polling_fallback_when_the_events_route_is_missing(no_sleep):
    states = iter(["queued", "processing", "succeeded"])

    def handler(request):
        if request.url.path.endswith("/events"):
            return httpx.Response(404, json={"error": {"type": "not_found", "message": "no route"}})
        return httpx.Response(200, json=edit_json(status=next(states)))

    seen = []
    with Client("http://api.test", transport=httpx.MockTransport(handler)) as client:
        assert client.wait("ed1", progress=seen.append, poll_interval=0.5).status is EditStatus.succeeded
    assert [e.status.value for e in seen] == ["queued", "processing", "succeeded"] and no_sleep == [0.5, 0.5]


def test_download_never_sends_the_api_key_to_storage_and_refreshes_expired_urls(tmp_path):
    storage_requests: list[httpx.Request] = []
    result = {"index": 0, "label": "x", "expires_at": "2026-01-01T00:00:00Z", "width": 8, "height": 8}

    def handler(request):
        if request.url.host == "s3.test":
            storage_requests.append(request)
            if request.url.params.get("sig") == "old":
                return httpx.Response(403, text="<Error>Request has expired</Error>")
            return httpx.Response(200, content=b"PNGDATA")
        fresh = {**result, "url": "http://s3.test/edits/ed1/output-0.png?sig=new"}
        return httpx.Response(200, json=edit_json(status="succeeded", results=[fresh]))

    stale = Edit.model_validate(edit_json(status="succeeded",
                                          results=[{**result, "url": "http://s3.test/edits/ed1/output-0.png?sig=old"}]))
    with Client("http://api.test", api_key="esk_secret", transport=httpx.MockTransport(handler)) as client:
        [path] = client.download(stale, tmp_path)
    assert path.read_bytes() == b"PNGDATA" and path.name == "ed1-output-0.png"
    assert [r.url.params["sig"] for r in storage_requests] == ["old", "new"]
    assert all("authorization" not in r.headers for r in storage_requests)


def test_sse_decoder_and_progress_rendering():
    decoder = _SSEDecoder()
    frames = [decoder.feed(line) for line in
              [": keep-alive", "", "event: status", "id: 3", 'data: {"a":', "data: 1}", "", "data: x", ""]]
    assert [f for f in frames if f] == [("status", '{"a":\n1}'), ("message", "x")]
    edit = Edit.model_validate(edit_json(status="processing", progress={"step": 5, "total": 10}, eta_seconds=65))
    line = render(edit, 3)
    assert "processing" in line and "5/10" in line and "eta 1m05s" in line and "#" * 12 in line


def test_local_image_and_request_checks():
    with Client("http://api.test", transport=httpx.MockTransport(lambda r: httpx.Response(500))) as client:
        with pytest.raises(TypeError):
            client.submit_ip2p(12345, "x")
        with pytest.raises(errors.InvalidRequestError) as both:
            client.submit({"kind": "ip2p", "instruction": "x", "image": "aGVsbG8="}, image=b"png")
        assert both.value.field == "image"
        with pytest.raises(errors.InvalidRequestError) as photo_and_inline:
            client.submit({"kind": "p2p", "source_prompt": "a", "target_prompts": ["b"], "image": "aGVsbG8="},
                          image=b"png")
        assert photo_and_inline.value.field == "image"
    sent: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(400, json={"error": {"type": "invalid_request", "message": "x", "field": "image"}})

    with Client("http://api.test", transport=httpx.MockTransport(record)) as client:
        # a P2P edit of a photo (issue 11): the photo travels as the multipart file part, like an IP2P input
        with pytest.raises(errors.APIError):
            client.submit({"kind": "p2p", "source_prompt": "a cat", "target_prompts": ["a dog"]}, image=b"png")
    assert len(sent) == 1 and sent[0].headers["content-type"].startswith("multipart/form-data")
    assert b'name="image"' in sent[0].content and b'name="request"' in sent[0].content


def test_package_exports():
    for name in ("Client", "AsyncClient", "errors", "verify_webhook", "Edit", "EditRequest", "WebhookEvent",
                 "APIError", "EditFailed", "EditCanceled"):
        assert hasattr(editserve, name), name
    from editserve.client import verify_webhook

    assert verify_webhook is editserve.verify_webhook
