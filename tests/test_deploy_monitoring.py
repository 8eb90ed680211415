"""Alert rules and dashboards against the real thing: promtool checks and unit-tests every rule, parses every
dashboard and KEDA query, and every metric and label those queries name is one that a running gateway, GPU
worker and webhook sender export (scraped over HTTP after a real edit went through them).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from editserve import Client, EditStatus
from devtools.devstack import LocalStack, free_port

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "deploy/prometheus/rules").glob("*.yml"))
RULE_TESTS = sorted((REPO / "deploy/prometheus/tests").glob("*.yml"))
DASHBOARDS = sorted((REPO / "deploy/grafana/dashboards").glob("*.json"))
SCALED_OBJECTS = REPO / "deploy/k8s/overlays/gpu/keda.yaml"
# NVIDIA dcgm-exporter's default counters (etc/default-counters.csv) and the labels it puts on them.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE",
                "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_XID_ERRORS"}
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname", "pod", "namespace", "container"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for d in DASHBOARDS for p in json.loads(d.read_text())["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def keda_exprs() -> list[str]:
    return [t["metadata"]["query"] for doc in yaml.safe_load_all(SCALED_OBJECTS.read_text()) if doc
            for t in doc["spec"]["triggers"] if t["type"] == "prometheus"]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=REPO)


# ---------------------------------------------------------------------------------------------- promtool

def test_rule_files_pass_promtool_check_and_every_alert_has_a_unit_test():
    assert RULE_FILES and RULE_TESTS
    out = promtool("check", "rules", *map(str, RULE_FILES))
    assert out.returncode == 0, out.stdout + out.stderr
    alerts = {r["alert"] for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
              if "alert" in r}
    assert {"EditserveQueueWaitHigh", "EditserveEditFailureRatioHigh", "EditserveNoLiveWorker",
            "EditserveWebhookFailureRateHigh", "EditserveS3ErrorsHigh", "EditserveGateway5xxHigh"} <= alerts
    tested, fired = set(), set()
    for f in RULE_TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                tested.add(check["alertname"])
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert alerts <= fired, f"alerts without a test that makes them fire: {alerts - fired}"


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", *map(str, RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_fail_when_an_alert_breaks(tmp_path):
    """The unit tests catch a broken rule (here: the no-live-worker alert inverted)."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for f in RULE_FILES:
        (tmp_path / "rules" / f.name).write_text(f.read_text().replace("unless on (model)", "and on (model)"))
    for f in RULE_TESTS:
        (tmp_path / "tests" / f.name).write_text(f.read_text())
    out = promtool("test", "rules", *[str(tmp_path / "tests" / f.name) for f in RULE_TESTS])
    assert out.returncode != 0 and "EditserveNoLiveWorker" in out.stdout + out.stderr


def test_dashboard_and_keda_queries_are_valid_promql(tmp_path):
    exprs = dashboard_exprs() + keda_exprs()
    assert len(exprs) > 20
    rules = {"groups": [{"name": "syntax", "rules": [{"record": f"syntax:q{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------------------- live scrape

def exported_labels(texts: list[str]) -> dict[str, set[str]]:
    """Sample name -> label names, from scraped exposition text. Families a process declares but has not
    observed yet (labelled, no samples) take the label names service.metrics declares for them."""
    from service import metrics

    declared = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    out: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
            if not family.samples:
                for sfx in SUFFIXES.get(family.type, [""]):
                    out.setdefault(family.name + sfx, set()).update(
                        declared.get(family.name, set()) | ({"le"} if sfx == "_bucket" else set()))
    return out


def check_expr(expr: str, exported: dict[str, set[str]]) -> list[str]:
    problems = []
    names = set()
    for name, braces in re.findall(r"\b((?:editserve|DCGM)_[A-Za-z0-9_]+)(\{[^}]*\})?", expr):
        names.add(name)
        known = DCGM_LABELS if name.startswith("DCGM_") else exported.get(name)
        if known is None or (name.startswith("DCGM_") and name not in DCGM_METRICS):
            problems.append(f"{name}: not exported")
            continue
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", braces):
            if label not in known | TARGET_LABELS:
                problems.append(f"{name}: no label {label!r} (has {sorted(known)})")
    assert names, f"no metric in {expr!r}"
    available = set(TARGET_LABELS)
    for name in names:
        available |= DCGM_LABELS if name.startswith("DCGM_") else exported.get(name, set())
    for group in re.findall(r"\b(?:by|on|ignoring|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (s.strip() for s in group.split(","))):
            if label not in available:
                problems.append(f"grouping label {label!r} is on none of {sorted(names)}")
    return problems


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scraped(redis_server, s3_server, tiny_models) -> dict[str, set[str]]:
    """/metrics of a real gateway, GPU worker (tiny model, CPU) and webhook sender after one edit."""
    url = redis_server.url.rsplit("/", 1)[0] + "/13"
    import redis

    redis.Redis.from_url(url).flushdb()
    hooks = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    worker_port, sender_port = free_port(), free_port()
    stack = LocalStack(redis_url=url, s3=s3_server, models_dir=tiny_models["tiny-sd"].parent,
                       extra_env={"EDITSERVE_WEBHOOKS__ALLOW_HOSTS": '["127.0.0.1"]',
                                  "EDITSERVE_WEBHOOKS__METRICS_PORT": str(sender_port),
                                  "EDITSERVE_WORKER__MAX_BATCH_WAIT_MS": "0"})
    try:
        stack.start_gateway()
        stack.start_webhook_sender()
        stack.start_worker("metrics-worker", models="tiny-sd",
                           env={"EDITSERVE_WORKER__METRICS_PORT": str(worker_port)})
        with Client(stack.base_url, timeout=30) as client:
            edit = client.submit_p2p("a photo of a cat", ["a photo of a dog"], edit="replace", steps=3, height=64,
                                     width=64, seed=1, webhook={"url": f"http://127.0.0.1:{hooks.server_address[1]}/h",
                                                                "events": ["completed"]})
            assert client.wait(edit.id, timeout=240, progress=False).status == EditStatus.succeeded
            httpx.get(f"{stack.base_url}/v1/edits/nope")  # a 4xx too
        texts = []
        for port in (stack.gateway_port, worker_port, sender_port):
            for _ in range(100):  # the sender's delivery counter lands right after the completed event
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                if port != sender_port or "editserve_webhook_deliveries_total{" in text:
                    break
                threading.Event().wait(0.2)
            texts.append(text)
        return exported_labels(texts)
    finally:
        stack.stop()
        hooks.shutdown()


@pytest.mark.e2e
def test_live_processes_export_what_the_rules_need(scraped):
    expected = {
        "editserve_queue_wait_seconds_bucket": {"model", "kind", "le"},
        "editserve_job_duration_seconds_bucket": {"model", "kind", "le"},
        "editserve_jobs_completed_total": {"model", "kind", "status"},
        "editserve_queue_depth": {"model", "priority"},
        "editserve_running_edits": {"model"},
        "editserve_live_workers": {"model"},
        "editserve_webhook_deliveries_total": {"outcome"},
        "editserve_s3_operations_total": {"operation", "outcome"},
        "editserve_http_requests_total": {"route", "method", "code"},
    }
    for name, labels in expected.items():
        assert scraped.get(name) == labels, (name, scraped.get(name))


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["dashboards", "rules", "keda"])
def test_every_query_names_exported_metrics_and_labels(scraped, source):
    exprs = {"dashboards": dashboard_exprs, "rules": rule_exprs, "keda": keda_exprs}[source]()
    problems = {e: p for e in exprs if (p := check_expr(e, scraped))}
    assert not problems, json.dumps(problems, indent=1)


def test_the_query_check_catches_an_unknown_metric_or_label():
    exported = {"editserve_x_total": {"model"}}
    assert check_expr('sum by (model) (rate(editserve_x_total{model="a"}[5m]))', exported) == []
    assert check_expr("rate(editserve_y_total[5m])", exported) == ["editserve_y_total: not exported"]
    assert check_expr('editserve_x_total{queue="a"}', exported)
    assert check_expr("sum by (queue) (editserve_x_total)", exported)
