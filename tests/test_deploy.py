"""What docker-compose, Prometheus and Grafana reference must exist and work (no Docker engine here)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _python_module_of(command: list[str]) -> str | None:
    if "-m" in command:
        return command[command.index("-m") + 1]
    if command and command[0] == "gunicorn":
        return command[-1].split(":")[0]
    return None


def test_compose_commands_point_at_real_modules():
    seen = set()
    for name, svc in COMPOSE["services"].items():
        if "build" not in svc:
            continue
        module = _python_module_of(svc["command"])
        assert module, f"service {name}: cannot tell which module it runs"
        assert importlib.util.find_spec(module) is not None, f"service {name} runs missing module {module}"
        seen.add(name)
    assert {"gateway", "worker", "webhooks"} <= seen


def test_compose_environment_is_understood_by_settings(monkeypatch):
    from service.config import Settings

    env = {k: str(v) for k, v in COMPOSE["x-editserve-env"].items()}
    for key, value in env.items():
        monkeypatch.setenv(key, re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value))
    s = Settings()
    assert s.redis_url == "redis://redis:6379/0"
    assert s.s3.endpoint_url == "http://minio:9000" and s.s3.public_endpoint_url == "http://localhost:9000"
    assert s.auth.required is True and s.auth.admin_token
    assert {"sd14", "ip2p"} <= set(s.model_catalog())
    assert s.model_catalog()["ip2p"].source == "timbrooks/instruct-pix2pix"


def test_prometheus_scrapes_compose_services():
    prom = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in COMPOSE["services"], target


def test_grafana_dashboard_is_current_and_queries_real_metrics():
    sys.path.insert(0, str(REPO / "deploy/grafana"))
    try:
        import build_dashboard
    finally:
        sys.path.pop(0)
    committed = json.loads((REPO / "deploy/grafana/dashboards/editserve.json").read_text())
    assert committed == build_dashboard.build(), "run: python deploy/grafana/build_dashboard.py"

    import service.metrics as m
    from prometheus_client import REGISTRY

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    exported = {m.QUEUE_DEPTH_NAME}
    for family in REGISTRY.collect():  # labelled families have no samples until observed: use their types
        exported.update(family.name + sfx for sfx in suffixes.get(family.type, [""]))
    exprs = [t["expr"] for p in committed["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"editserve_[a-z_]+", e)}
    missing = used - exported
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"


@pytest.mark.e2e
def test_gunicorn_config_aggregates_metrics_across_processes(tmp_path, redis_url):
    from devtools.devstack import free_port, wait_for_http

    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"), EDITSERVE_BIND=f"127.0.0.1:{port}",
               EDITSERVE_GATEWAY_PROCESSES="2", EDITSERVE_REDIS_URL=redis_url)
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "service.app:app"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
        with httpx.Client() as c:  # new connections, so both worker processes get traffic
            for _ in range(40):
                assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            text = c.get(f"http://127.0.0.1:{port}/metrics").text
        pids = {p.name for p in (tmp_path / "prom").iterdir()}
        assert len({re.findall(r"_(\d+)\.db$", p)[0] for p in pids if p.endswith(".db")}) >= 2, pids
        total = sum(float(v) for v in re.findall(
            r'editserve_http_requests_total\{[^}]*route="/healthz"[^}]*\} ([0-9.e+]+)', text))
        assert total >= 40, text[:2000]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(20)
