"""Schemathesis against the real gateway (real Redis and S3), generated from the committed openapi.json.

A bounded, deterministic run for CI; ``python bench/fuzz.py`` runs many more cases. The contract: no 5xx,
and every 4xx is the standard error body with a message (and a field when a field is at fault).
"""

from __future__ import annotations

import pytest
from fuzz_support import response_problem, run_fuzz
from gateway_support import make_settings, p2p_payload

from service.app import create_app
from service.jobstore import new_edit_id

CASES_PER_OPERATION_AND_MODE = 15
ADMIN_TOKEN = "fuzz-admin-token"


@pytest.fixture
def fuzz_app(redis_url, s3):
    settings = make_settings(redis_url, s3, auth={"admin_token": ADMIN_TOKEN},
                             limits={"tenant_rps": 0, "max_wait_seconds": 1, "tenant_max_queued": 100_000})
    app = create_app(settings, prepare_bucket=False)
    app.state.services.sse_keepalive_seconds = 0.2
    return app


def test_fuzzed_requests_never_get_5xx_and_every_4xx_names_the_problem(fuzz_app):
    key = fuzz_app.state.services.keys.create_key("fuzz").key
    store = fuzz_app.state.services.jobstore
    edit_ids = tuple(store.create(p2p_payload(new_edit_id(), "fuzz"), webhook=None, idempotency_key=None)[0].id
                     for _ in range(3))
    report = run_fuzz(fuzz_app, max_examples=CASES_PER_OPERATION_AND_MODE, tenant_key=key, admin_token=ADMIN_TOKEN,
                      edit_ids=edit_ids)
    findings = "\n".join(f"{f.operation} → {f.status}: {f.problem}\n  {f.request}\n  {f.response}"
                         for f in report.findings[:10])
    assert not report.findings, f"{report.summary()}\n{findings}"
    assert report.cases >= 200, report.summary()
    assert {200, 201, 202, 401, 404, 422} <= set(report.by_status), report.summary()  # it got past validation


def test_the_checker_flags_broken_responses():
    ok = b'{"error": {"type": "invalid_request", "message": "steps: too big", "field": "steps"}}'
    assert response_problem(422, ok) is None
    assert response_problem(200, b"anything") is None
    assert response_problem(500, ok) == "server error 500"
    assert response_problem(404, b"Not Found") == "4xx body is not JSON"
    assert response_problem(400, b'{"detail": "x"}') == "4xx body has no `error` object"
    assert response_problem(400, b'{"error": {"type": "x", "message": " ", "field": null}}') == \
        "error.message is empty"
    assert response_problem(422, b'{"error": {"type": "x", "message": "bad", "field": null}}') == \
        "422 without error.field"


def test_a_server_error_is_found(fuzz_app, monkeypatch):
    """The harness really reaches the app: break one route and the fuzzer reports it."""
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fuzz_app.state.services.jobstore, "list", broken)
    key = fuzz_app.state.services.keys.create_key("fuzz").key
    report = run_fuzz(fuzz_app, max_examples=5, tenant_key=key, admin_token=ADMIN_TOKEN,
                      skip=lambda label: label != "GET /v1/edits")
    assert any(f.problem.startswith("server error") and "boom" in f.problem for f in report.findings), \
        report.summary()
