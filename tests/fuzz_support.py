"""Schemathesis fuzzing of the gateway from the committed openapi/openapi.json (tests/test_fuzz.py runs a few
cases per operation; bench/fuzz.py runs many).

The contract checked on every response: no 5xx, and every 4xx is ``{"error": {"type", "message", "field"}}``
with a non-empty message, and a 422 names the field unless the problem is the body as a whole.
Cases are sent in-process to the real ASGI app (real Redis and S3 behind it). Three in four carry valid
credentials (a tenant key, or the admin token on admin routes) so generation gets past authentication;
the other quarter keep whatever Authorization header schemathesis generated.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"
BODY_LEVEL_MESSAGES = ("request body", "the `request` part", "multipart body")


@dataclass
class Finding:
    operation: str
    status: int
    problem: str
    request: str
    response: str


@dataclass
class FuzzReport:
    cases: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    samples: dict | None = None  # (operation, status) → [(request, response)] when asked for

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.by_status.items()))
        return f"{self.cases} cases ({statuses}); {len(self.findings)} problems"


def response_problem(status: int, body: bytes) -> str | None:
    """Why a response breaks the error contract, or None."""
    if status >= 500:
        return f"server error {status}"
    if not 400 <= status < 500:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return "4xx body is not JSON"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return "4xx body has no `error` object"
    if set(error) != {"type", "message", "field"}:
        return f"error keys are {sorted(error)}"
    if not isinstance(error["type"], str) or not error["type"]:
        return "error.type is empty"
    if not isinstance(error["message"], str) or not error["message"].strip():
        return "error.message is empty"
    if error["field"] is not None and (not isinstance(error["field"], str) or not error["field"]):
        return "error.field is neither null nor a name"
    if status == 422 and error["field"] is None and not error["message"].startswith(BODY_LEVEL_MESSAGES):
        return "422 without error.field"
    return None


def load_schema(app) -> Any:
    schema = schemathesis.openapi.from_path(str(OPENAPI_PATH))
    schema.app = app  # in-process ASGI transport
    return schema


def run_fuzz(app, *, max_examples: int, tenant_key: str, admin_token: str, derandomize: bool = True,
             modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
             skip: Callable[[str], bool] = lambda label: False, seed: int | None = None,
             edit_ids: tuple[str, ...] = ()) -> FuzzReport:
    """Generate ``max_examples`` cases per operation and mode, send them, and check every response.

    ``edit_ids`` (the tenant's own edits) replace the generated ``edit_id`` in every other GET/cancel case,
    so those reach a real record instead of a 404.
    """
    report = FuzzReport()
    for result in load_schema(app).get_all_operations():
        operation = result.ok()
        if skip(operation.label):
            continue
        for mode in modes:
            _fuzz_operation(operation, mode, report, max_examples=max_examples, tenant_key=tenant_key,
                            admin_token=admin_token, derandomize=derandomize, seed=seed, edit_ids=edit_ids)
    return report


def _fuzz_operation(operation, mode, report: FuzzReport, *, max_examples: int, tenant_key: str, admin_token: str,
                    derandomize: bool, seed: int | None, edit_ids: tuple[str, ...]) -> None:
    valid = f"Bearer {admin_token if operation.path.startswith('/v1/admin') else tenant_key}"
    real_ids = edit_ids if "{edit_id}" in operation.path and not operation.path.endswith("/events") else ()

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate),
              verbosity=Verbosity.quiet)
    @given(case=operation.as_strategy(mode))
    def check(case) -> None:
        report.cases += 1
        if report.cases % 4:  # 1 in 4 keeps the generated Authorization header
            case.headers = {**{k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"},
                            "Authorization": valid}
        if real_ids and report.cases % 2 and isinstance(case.path_parameters, dict):
            case.path_parameters["edit_id"] = real_ids[report.cases % len(real_ids)]
        try:
            response = case.call()
        except Exception as exc:  # noqa: BLE001 — the in-process transport re-raises what the app raised
            report.findings.append(Finding(operation.label, 500, f"server error: the app raised {exc!r}",
                                           describe(case), ""))
            return
        report.by_status[response.status_code] += 1
        if report.samples is not None:
            report.samples.setdefault((operation.label, response.status_code), []).append(
                (describe(case), response.content[:300].decode("utf-8", "replace")))
        report.by_operation[(operation.label, response.status_code)] += 1
        problem = response_problem(response.status_code, response.content)
        if problem:
            report.findings.append(Finding(operation.label, response.status_code, problem, describe(case),
                                           response.content[:400].decode("utf-8", "replace")))

    if seed is not None and not derandomize:
        from hypothesis import seed as hypothesis_seed

        check = hypothesis_seed(seed)(check)
    try:
        check()
    except Unsatisfiable:  # nothing to negate (an operation without parameters in negative mode)
        pass


def describe(case) -> str:
    body = case.body if not hasattr(case.body, "__len__") or len(str(case.body)) < 400 else str(case.body)[:400]
    return (f"{case.method} {case.formatted_path} query={case.query} headers="
            f"{ {k: v for k, v in (case.headers or {}).items() if k.lower() != 'authorization'} } body={body!r}")
