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
    assert {"gateway", "worker-cpu", "worker-gpu", "webhooks", "models-init"} <= seen


def _example_env() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _substitute(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} with ``env`` (what the user's .env would give)."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in env:
            return env[name]
        assert op != ":?", f"{name} is required but not in .env.example"
        return arg if op == ":-" else ""
    return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, value)


def test_compose_environment_is_understood_by_settings(monkeypatch):
    from service.config import Settings

    example = _example_env()
    for key, value in COMPOSE["x-editserve-env"].items():
        monkeypatch.setenv(key, _substitute(str(value), example))
    s = Settings()
    assert s.redis_url == "redis://redis:6379/0"
    assert s.s3.endpoint_url == "http://minio:9000" and s.s3.public_endpoint_url == "http://localhost:9000"
    assert s.s3.secret_access_key == example["EDITSERVE_S3_SECRET"]
    assert s.auth.required is True and s.auth.admin_token == example["EDITSERVE_ADMIN_TOKEN"]
    assert {"sd14", "ip2p", "tiny-sd"} <= set(s.model_catalog())
    assert s.model_catalog()["ip2p"].source == "timbrooks/instruct-pix2pix"
    assert s.default_p2p_model in s.model_catalog() and s.default_ip2p_model in s.model_catalog()


def test_compose_file_validates_against_the_compose_schema():
    out = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = REPO / ".run" / "compose-broken.yml"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text(yaml.safe_dump({"services": {"x": {"image": "a:1", "depends_on": {"y": {"condition": "up"}}}}}))
    out = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1  # the schema really checks: "up" is no depends_on condition


def test_compose_every_editserve_variable_is_a_setting():
    from test_deploy_k8s import assert_env_vars_known

    names = set(COMPOSE["x-editserve-env"])
    for svc in COMPOSE["services"].values():
        names |= set(svc.get("environment", {}))
    assert_env_vars_known(names)


def test_compose_profiles_healthchecks_pinned_images_and_no_default_secrets():
    services = COMPOSE["services"]
    cpu = {n for n, s in services.items() if "cpu" in s.get("profiles", [])}
    gpu = {n for n, s in services.items() if "gpu" in s.get("profiles", [])}
    assert {"models-init", "worker-cpu"} <= cpu and {"worker-gpu", "dcgm-exporter"} <= gpu
    assert "nvidia" not in json.dumps({n: services[n] for n in cpu})  # the cpu profile reserves no GPU
    assert "nvidia" in json.dumps(services["worker-gpu"]["deploy"])
    # The cpu worker starts only once the init service has built the tiny models into the shared volume.
    init = services["models-init"]
    assert init["command"][:3] == ["python", "-m", "worker.models.builders"]
    assert services["worker-cpu"]["depends_on"]["models-init"] == {"condition": "service_completed_successfully"}
    init_volume = init["volumes"][0].split(":")
    assert init_volume[1] == init["command"][-1] and init["volumes"][0] in services["worker-cpu"]["volumes"]
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"
        if svc.get("restart") == "no":  # a one-shot: depended on with service_completed_successfully
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            expected = ("service_completed_successfully" if services[dep].get("restart") == "no"
                        else "service_healthy")
            assert cond == {"condition": expected}, (name, dep)
    for name in ("gateway", "webhooks", "worker-cpu", "worker-gpu", "prometheus", "grafana"):
        assert services[name].get("depends_on"), f"{name} starts before what it needs"
    text = (REPO / "docker-compose.yml").read_text()
    for secret in ("EDITSERVE_S3_SECRET", "EDITSERVE_ADMIN_TOKEN", "EDITSERVE_WEBHOOK_SECRET", "GRAFANA_ADMIN_PASSWORD",
                   "EDITSERVE_S3_ACCESS_KEY"):
        uses = re.findall(r"\$\{" + secret + r"(:[-?][^}]*)?\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret} must come from .env, without default"
        assert secret in _example_env()
    assert ".env" in (REPO / ".gitignore").read_text().split()


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
    exported = set(m.COLLECTED_NAMES)
    for family in REGISTRY.collect():  # labelled families have no samples until observed: use their types
        exported.update(family.name + sfx for sfx in suffixes.get(family.type, [""]))
    exprs = [t["expr"] for p in committed["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"editserve_[a-z0-9_]+", e)}
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
