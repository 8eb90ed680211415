"""Inversions from the SDK and the CLI (issue 11, client side): ``Client.invert`` / ``wait_inversion`` /
``download_inversion`` / ``submit_p2p(inversion=...)``, ``AsyncClient``'s twins, and ``editserve invert`` /
``editserve edit p2p --inversion``, against a real uvicorn gateway, real Redis and the SeaweedFS S3 endpoint, with a
real batching worker (in-process, tiny-sd-smooth at 64 px) running the jobs.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from datetime import UTC, datetime

import httpx
import pytest
from gateway_support import gateway_app, gateway_settings, live  # noqa: F401  (fixtures)
from PIL import Image
from test_inversion_service import photo_png, smooth_registry, worker  # noqa: F401  (fixtures)

from editserve import cli, errors
from editserve.client import AsyncClient, Client
from editserve.contract import EditStatus, Inversion, InversionProgress
from editserve.progress import render
from worker.runtime.inversions import inversion_from_bytes

MODEL, SIZE, STEPS, INNER = "tiny-sd-smooth", 64, 4, 2
CAPTION, TARGET = "a photo of an astronaut", "a photo of an robot"
KNOBS = dict(model=MODEL, steps=STEPS, resolution=SIZE, num_inner_steps=INNER)


class Runner(threading.Thread):
    """The worker taking one batch while the client waits (as a worker process would)."""

    def __init__(self, w):
        super().__init__(daemon=True)
        self.w, self.error = w, None

    def run(self):
        try:
            self.w.run_once(timeout=30)
        except BaseException as exc:  # noqa: BLE001 — surfaced by the test
            self.error = exc

    def done(self):
        self.join(120)
        assert not self.is_alive() and self.error is None, self.error


def serve_one(worker):  # noqa: F811
    runner = Runner(worker())
    runner.start()
    return runner


def test_invert_wait_download_then_edit_from_it(live, worker, photo_png, tmp_path):  # noqa: F811
    with Client(live.url, timeout=30) as client:
        photo = Image.open(io.BytesIO(photo_png))  # a PIL image (paths, bytes and files go the same way)
        inversion = client.invert(photo, CAPTION, method="null-text", metadata={"run": "sdk"}, **KNOBS)
        assert isinstance(inversion, Inversion) and inversion.status is EditStatus.queued
        assert inversion.request["method"] == "null-text" and inversion.request["num_inner_steps"] == INNER
        assert inversion.metadata == {"run": "sdk"}

        runner = serve_one(worker)
        seen: list[Inversion] = []
        done = client.wait_inversion(inversion, timeout=120, progress=seen.append, poll_interval=0.05)
        runner.done()
        assert done.status is EditStatus.succeeded and seen[-1].id == done.id
        assert done.progress.step == done.progress.total == STEPS and 1 <= done.progress.inner_iterations <= INNER
        assert f"null-text step {STEPS}/{STEPS} inner {done.progress.inner_iterations}/{INNER}" in render(done, 1.0)

        paths = client.download_inversion(done, tmp_path / "out", arrays=True)
        assert [p.name for p in paths] == [f"{done.id}-reconstruction.png", f"{done.id}-inversion.safetensors"]
        assert Image.open(paths[0]).size == (SIZE, SIZE)
        stored = inversion_from_bytes(paths[1].read_bytes())
        assert tuple(stored.x_t.shape) == (1, 4, SIZE // 8, SIZE // 8) and stored.uncond_embeddings.shape[0] == STEPS
        assert client.download_inversion(done.id, tmp_path / "png") == [tmp_path / "png" / paths[0].name]

        assert client.get_inversion(done.id).status is EditStatus.succeeded
        assert [i.id for i in client.list_inversions(status="succeeded").data] == [done.id]
        again = client.invert(photo_png, CAPTION, method="null-text", **KNOBS)  # equal request, as bytes
        assert again.reused and again.id == done.id and again.status is EditStatus.succeeded

        edit = client.submit_p2p(CAPTION, TARGET, inversion=done, model=MODEL, steps=STEPS, size=SIZE, seed=0,
                                 cross_replace_steps=0.5, self_replace_steps=0.25)
        assert edit.params["inversion_id"] == done.id and edit.params["scheduler"] == "ddim"
        runner = serve_one(worker)
        finished = client.wait(edit.id, timeout=120, progress=False)
        runner.done()
        assert finished.status is EditStatus.succeeded and len(finished.results) == 2
        by_id = client.submit_p2p(CAPTION, [TARGET], inversion=done.id, model=MODEL, steps=STEPS, size=SIZE)
        assert by_id.params["inversion_id"] == done.id


def test_invert_errors_local_and_from_the_server(live, photo_png):  # noqa: F811
    with Client(live.url, timeout=30, retries=0) as client:
        for fields, field in [({"method": "textual"}, "method"), ({"num_inner_steps": 51}, "num_inner_steps"),
                              ({"guidance_scale": 0.5}, "guidance_scale"), ({"colour": 1}, "colour")]:
            with pytest.raises(errors.InvalidRequestError) as local:
                client.invert(photo_png, CAPTION, **{**KNOBS, **fields})
            assert local.value.status is None and local.value.field == field, fields  # refused before sending
        with pytest.raises(errors.InvalidRequestError) as empty:
            client.invert(photo_png, "", **KNOBS)
        assert empty.value.status is None and empty.value.field == "caption"
        with pytest.raises(errors.InvalidRequestError) as server:
            client.invert(photo_png, CAPTION, **{**KNOBS, "resolution": 96})  # the server knows the 64 multiple
        assert server.value.status == 422 and server.value.field == "resolution"
        with pytest.raises(errors.InvalidRequestError) as picture:
            client.invert(b"not a picture", CAPTION, **KNOBS)
        assert picture.value.status == 422 and picture.value.field == "image"
        with pytest.raises(errors.NotFoundError):
            client.get_inversion("0123456789abcdefghjkmnpqrs")
        with pytest.raises(errors.InvalidRequestError) as bad_edit:
            client.submit_p2p(CAPTION, TARGET, inversion="../x")
        assert bad_edit.value.status is None and bad_edit.value.field == "inversion_id"

        queued = client.invert(photo_png, "a queued astronaut", **KNOBS)
        assert client.cancel_inversion(queued).status is EditStatus.canceled
        with pytest.raises(errors.InversionCanceled) as canceled:
            client.wait_inversion(queued.id, timeout=10, progress=False, poll_interval=0.05)
        assert canceled.value.inversion.id == queued.id and isinstance(canceled.value, errors.EditCanceled)
        pending = client.invert(photo_png, "a waiting astronaut", **KNOBS)  # no worker: it stays queued
        with pytest.raises(errors.WaitTimeout) as timeout:
            client.wait_inversion(pending, timeout=0.3, progress=False, poll_interval=0.05)
        assert timeout.value.edit.id == pending.id and timeout.value.edit.status is EditStatus.queued


def test_async_client_inverts_and_edits(live, worker, photo_png, tmp_path):  # noqa: F811
    async def scenario():
        async with AsyncClient(live.url, timeout=30) as client:
            inversion = await client.invert(photo_png, CAPTION, method="negative-prompt", **KNOBS)
            runner = serve_one(worker)
            done = await client.wait_inversion(inversion.id, timeout=120, progress=False, poll_interval=0.05)
            runner.done()
            assert done.status is EditStatus.succeeded and done.request["method"] == "negative-prompt"
            assert (await client.get_inversion(done)).id == done.id
            assert [i.id for i in (await client.list_inversions()).data] == [done.id]
            paths = await client.download_inversion(done, tmp_path, arrays=True)
            assert [p.name for p in paths] == [f"{done.id}-reconstruction.png", f"{done.id}-inversion.safetensors"]
            edit = await client.submit_p2p(CAPTION, TARGET, inversion=done, model=MODEL, steps=STEPS, size=SIZE)
            assert edit.params["inversion_id"] == done.id
            queued = await client.invert(photo_png, "another astronaut", **KNOBS)
            assert (await client.cancel_inversion(queued)).status is EditStatus.canceled
            with pytest.raises(errors.InversionCanceled):
                await client.wait_inversion(queued, timeout=10, progress=False, poll_interval=0.05)

    asyncio.run(scenario())


def test_cli_invert_then_edit_from_the_inversion(live, worker, photo_png, tmp_path, capsys):  # noqa: F811
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(photo_png)
    base = ["--url", f"{live.url}/v1", "--timeout", "30"]

    runner = serve_one(worker)
    code = cli.main([*base, "invert", str(photo), "--caption", CAPTION, "--model", MODEL, "--steps", str(STEPS),
                     "--resolution", str(SIZE), "--inner-steps", str(INNER), "--guidance", "7.5",
                     "--out", str(tmp_path / "inv"), "--arrays"])
    runner.done()
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    inversion_id, *saved = out.split()
    assert saved == [str(tmp_path / "inv" / f"{inversion_id}-reconstruction.png"),
                     str(tmp_path / "inv" / f"{inversion_id}-inversion.safetensors")]
    assert Image.open(saved[0]).size == (SIZE, SIZE)
    assert f"{inversion_id} succeeded" in err and "reconstruction error (latent MSE)" in err
    assert f"editserve edit p2p --inversion {inversion_id}" in err

    # the edit takes its caption, model, size, steps, sampler and guidance from the inversion
    runner = serve_one(worker)
    code = cli.main([*base, "edit", "p2p", "--inversion", inversion_id, "--target", TARGET, "--seed", "0",
                     "--out", str(tmp_path / "edit"), "-q"])
    runner.done()
    out, err = capsys.readouterr()
    assert code == cli.EXIT_OK, err
    assert len(out.split()) == 2 and all(line.endswith(".png") for line in out.split())
    with httpx.Client(base_url=live.url) as http:
        edits = http.get("/v1/edits").json()["data"]
    assert edits[0]["params"]["inversion_id"] == inversion_id
    assert [r["label"] for r in edits[0]["results"]] == [CAPTION, TARGET]  # the caption is the source prompt
    assert (edits[0]["params"]["model"], edits[0]["params"]["steps"], edits[0]["params"]["height"]) == \
        (MODEL, STEPS, SIZE)

    assert cli.main([*base, "invert", str(photo), "--caption", CAPTION, "--model", MODEL, "--steps", str(STEPS),
                     "--resolution", str(SIZE), "--inner-steps", str(INNER), "--no-wait", "-q"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == inversion_id  # an equal request: the finished one, reused
    assert cli.main([*base, "get-inversion", inversion_id]) == cli.EXIT_OK
    assert Inversion.model_validate_json(capsys.readouterr().out).status is EditStatus.succeeded


def test_cli_invert_exit_codes(live, photo_png, tmp_path, capsys):  # noqa: F811
    photo = tmp_path / "p.png"
    photo.write_bytes(photo_png)
    base = ["--url", live.url, "--retries", "0"]
    small = ["--model", MODEL, "--steps", str(STEPS), "--inner-steps", str(INNER)]

    assert cli.main([*base, "invert", str(tmp_path / "missing.png"), "--caption", "x"]) == cli.EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    assert cli.main([*base, "invert", str(photo), "--caption", "x", "--inner-steps", "99"]) == cli.EXIT_USAGE
    assert "num_inner_steps" in capsys.readouterr().err
    assert cli.main([*base, "invert", str(photo), "--caption", "x", "--no-wait", "--out", "o"]) == cli.EXIT_USAGE
    assert cli.main([*base, "invert", str(photo), "--caption", "x", "--resolution", "96", *small]) == \
        cli.EXIT_REFUSED
    assert "resolution" in capsys.readouterr().err
    assert cli.main([*base, "edit", "p2p", "--inversion", "0123456789abcdefghjkmnpqrs", "--target", "y",
                     "--out", str(tmp_path)]) == cli.EXIT_REFUSED
    assert "404" in capsys.readouterr().err
    assert cli.main([*base, "edit", "p2p", "--target", "y", "--out", str(tmp_path)]) == cli.EXIT_USAGE
    assert "--source" in capsys.readouterr().err

    # canceled while the CLI waits: exit 4 (no worker runs here, so it stays queued until canceled)
    def cancel_when_queued():
        with Client(live.url) as other:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                queued = other.list_inversions(status="queued").data
                if queued:
                    other.cancel_inversion(queued[0])
                    return
                time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_queued, daemon=True)
    canceller.start()
    assert cli.main([*base, "invert", str(photo), "--caption", "a canceled astronaut", *small, "--resolution",
                     str(SIZE), "--wait-timeout", "60"]) == cli.EXIT_CANCELED
    canceller.join(10)
    out, err = capsys.readouterr()
    assert f"inversion {out.split()[0]} canceled" in err

    assert cli.main([*base, "invert", str(photo), "--caption", "a late astronaut", *small, "--resolution",
                     str(SIZE), "--wait-timeout", "0.5", "-q"]) == cli.EXIT_TIMEOUT
    out, err = capsys.readouterr()
    late = out.split()[0]
    assert f"editserve get-inversion {late}" in err
    assert cli.main([*base, "cancel-inversion", late]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"{late} canceled"


def test_inversion_progress_lines():
    now = datetime.now(UTC)

    def state(status, progress=None):
        return Inversion(id="inv1", status=status, model=MODEL, created_at=now, request={}, progress=progress)

    walking = state(EditStatus.processing, InversionProgress(phase="ddim", step=2, total=4))
    optimising = state(EditStatus.processing, InversionProgress(phase="null-text", step=3, total=4,
                                                                inner_iterations=7, inner_total=10))
    assert "ddim step 2/4" in render(walking, 0) and "inner" not in render(walking, 0)
    assert "null-text step 3/4 inner 7/10" in render(optimising, 0)
    lines = io.StringIO()
    reporter = cli.InversionReporter(quiet=False)
    reporter.bar.enabled = False
    import contextlib

    with contextlib.redirect_stderr(lines):
        for s in (state(EditStatus.queued), walking, walking, optimising, state(EditStatus.succeeded)):
            reporter(s)
    assert lines.getvalue().splitlines() == ["inv1 queued", "inv1 processing ddim step 2/4",
                                             "inv1 processing null-text step 3/4 inner 7/10", "inv1 succeeded"]


def test_invert_retries_send_one_body_and_one_idempotency_key(monkeypatch, photo_png):  # noqa: F811
    """A retried POST /v1/inversions is the same multipart body under the same key (the server runs it once)."""
    monkeypatch.setattr("editserve.client.time.sleep", lambda s: None)
    now = datetime.now(UTC).isoformat()
    calls: list[httpx.Request] = []
    replies = [httpx.Response(503, headers={"Retry-After": "1"}),
               httpx.Response(202, json={"id": "inv1", "status": "queued", "model": MODEL, "created_at": now,
                                         "request": {"caption": CAPTION, "method": "ddim"}})]

    def handler(request):
        calls.append(request)
        return replies.pop(0)

    with Client("http://api.test", transport=httpx.MockTransport(handler), retries=2) as client:
        assert client.invert(photo_png, CAPTION, method="ddim", steps=STEPS).id == "inv1"
    assert [r.url.path for r in calls] == ["/v1/inversions"] * 2
    assert len({r.headers["idempotency-key"] for r in calls}) == 1
    assert all(r.headers["content-type"].startswith("multipart/form-data; boundary=") for r in calls)

    def unframed(r: httpx.Request) -> bytes:  # httpx draws a new multipart boundary per attempt
        return r.content.replace(r.headers["content-type"].split("boundary=")[1].encode(), b"B")

    assert unframed(calls[0]) == unframed(calls[1])
    body = calls[0].content
    assert b'{"caption": "a photo of an astronaut", "method": "ddim", "steps": 4}' in body  # only what was set
    assert photo_png in body
