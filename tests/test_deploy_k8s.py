"""The Kubernetes files, proven without a cluster: every object both overlays render validates against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields fail) and KEDA / prometheus-operator objects
against validators generated from their CRDs (npm @kubernetes-models/keda and /prometheus-operator, run by
node in deploy/k8s/crd-check). Then what the issue asks of each part is checked on the rendered objects.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from service.config import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy/k8s"
K8S_VERSION = "1.32.0"
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
PRIVATE_V4 = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8", "100.64.0.0/10"}
# EDITSERVE_* variables read by process start-up code rather than by the settings.
PROCESS_VARS = {"EDITSERVE_GATEWAY_PROCESSES": "deploy/gunicorn.conf.py", "EDITSERVE_BIND": "deploy/gunicorn.conf.py",
                "EDITSERVE_LOG_LEVEL": "worker/runtime/worker.py"}


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(pod_owner: dict) -> list[dict]:
    spec = pod_owner["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_names(objects: list[dict]) -> set[str]:
    names = set()
    for cm in by_kind(objects, "ConfigMap").values():
        names |= set(cm.get("data", {}))
    for dep in by_kind(objects, "Deployment").values():
        names |= {e["name"] for c in containers(dep) for e in c.get("env", [])}
    return names


def settings_env_vars() -> set[str]:
    """Every EDITSERVE_ variable the settings read (nested models with ``__``)."""
    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"EDITSERVE_{field.upper()}")
        sub = getattr(info.annotation, "model_fields", None)
        if sub:
            names |= {f"EDITSERVE_{field.upper()}__{s.upper()}" for s in sub}
    return names


def assert_env_vars_known(names: set[str]) -> None:
    known = settings_env_vars()
    for name in {n for n in names if n.startswith("EDITSERVE_")} - known:
        assert name in PROCESS_VARS, f"{name} is neither a setting nor a known process variable"
        assert name in (REPO / PROCESS_VARS[name]).read_text(), f"{PROCESS_VARS[name]} no longer reads {name}"


def worker_models(dep: dict) -> list[str]:
    command = dep["spec"]["template"]["spec"]["containers"][0]["command"]
    return command[command.index("--models") + 1].split(",")


# ------------------------------------------------------------------------------------------- schemas

def test_core_objects_validate_against_the_kubernetes_schemas(rendered):
    _, objects = rendered
    core = [o for o in objects if not o["apiVersion"].startswith(CRD_GROUPS)]
    assert len(core) >= 15
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)  # raises on any schema error


def test_strict_validation_rejects_a_misspelt_field():
    """The validator really is strict: the check above would catch a typo."""
    dep = by_kind(render("cpu"), "Deployment")["gateway"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def run_crd_check(objects: list[dict]) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(K8S / "crd-check/validate.mjs")], input=json.dumps(objects),
                          capture_output=True, text=True, timeout=120)


def test_keda_and_prometheus_operator_objects_validate_against_their_crd_schemas():
    objects = [o for o in render("gpu") if o["apiVersion"].startswith(CRD_GROUPS)]
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["PrometheusRule", "ScaledObject", "ServiceMonitor"]
    out = run_crd_check(objects)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(out.stdout.splitlines()) == len(objects)
    broken = json.loads(json.dumps(objects[0]))
    broken["spec"]["minReplicaCount" if broken["kind"] == "ScaledObject" else "groups"] = "zero"
    assert run_crd_check([broken]).returncode == 1  # the validator rejects a wrong type


# --------------------------------------------------------------------------------------------- gateway

def test_gateway_has_service_hpa_pdb_and_probes(rendered):
    _, objects = rendered
    gateway = by_kind(objects, "Deployment")["gateway"]
    labels = gateway["spec"]["selector"]["matchLabels"]
    service = by_kind(objects, "Service")["gateway"]
    assert service["spec"]["selector"] == labels
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = by_kind(objects, "PodDisruptionBudget")["gateway"]
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "service.app:app" in container["command"]


# --------------------------------------------------------------------------------------------- workers

def test_gpu_workers_one_per_model_with_gpu_cache_readiness_and_grace_above_the_longest_batch():
    objects = render("gpu")
    workers = {n: d for n, d in by_kind(objects, "Deployment").items() if n.startswith("worker-")}
    catalog = Settings().model_catalog()
    served = []
    for name, dep in workers.items():
        models = worker_models(dep)
        assert len(models) == 1 and models[0] in catalog and name == f"worker-{models[0]}"
        served += models
        pod = dep["spec"]["template"]["spec"]
        worker = pod["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        cache = {v["name"] for v in pod["volumes"]} & {m["name"] for m in worker["volumeMounts"]}
        assert "model-cache" in cache
        assert worker["readinessProbe"]["httpGet"]["port"] == "metrics"
        assert {"name": "metrics", "containerPort": Settings().worker.metrics_port} in worker["ports"]
        env = {e["name"]: e.get("value") for e in worker["env"]}
        assert pod["terminationGracePeriodSeconds"] > int(env["EDITSERVE_WORKER__JOB_TIMEOUT_SECONDS"])
        assert "replicas" not in dep["spec"]  # KEDA owns the count
    assert sorted(served) == ["ip2p", "sd14"]
    pvc = by_kind(objects, "PersistentVolumeClaim")["model-cache"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_keda_scales_each_worker_from_zero_on_queued_plus_running_edits():
    objects = render("gpu")
    deployments = by_kind(objects, "Deployment")
    scaled = by_kind(objects, "ScaledObject")
    gpu_workers = {n for n in deployments if n.startswith("worker-")}
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled.values()} == gpu_workers
    for so in scaled.values():
        model = worker_models(deployments[so["spec"]["scaleTargetRef"]["name"]])[0]
        spec = so["spec"]
        assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] >= 300
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        query = trigger["metadata"]["query"]
        assert f'editserve_queue_depth{{model="{model}"}}' in query  # waiting...
        assert f'editserve_running_edits{{model="{model}"}}' in query  # ...and running: busy GPUs stay up
        assert trigger["metadata"]["activationThreshold"] == "0"
        assert float(trigger["metadata"]["threshold"]) >= Settings().worker.max_batch_size


def test_cpu_tryout_needs_no_gpu_and_builds_the_tiny_models_first():
    objects = render("cpu")
    assert "nvidia.com/gpu" not in json.dumps(objects)
    assert not [o for o in objects if o["apiVersion"].startswith(CRD_GROUPS)]  # no KEDA/operator needed
    worker = by_kind(objects, "Deployment")["worker-tiny"]
    (init,) = worker["spec"]["template"]["spec"]["initContainers"]
    assert init["command"][:3] == ["python", "-m", "worker.models.builders"]
    models_dir = by_kind(objects, "ConfigMap")["editserve-config"]["data"]["EDITSERVE_MODELS_DIR"]
    assert init["command"][-1] == models_dir
    catalog = Settings(models_dir=Path(models_dir)).model_catalog()
    assert all(catalog[m].random_weights for m in worker_models(worker))
    assert {"redis", "minio"} <= set(by_kind(objects, "Service"))


# ------------------------------------------------------------------------------------ config & secrets

def test_env_vars_are_settings_and_secrets_are_references_only(rendered):
    _, objects = rendered
    assert_env_vars_known(env_names(objects))
    assert not by_kind(objects, "Secret"), "no Secret with values ships: the operator creates editserve-secrets"
    refs = [e["valueFrom"]["secretKeyRef"] for d in by_kind(objects, "Deployment").values()
            for c in containers(d) for e in c.get("env", []) if "valueFrom" in e]
    assert refs and {r["name"] for r in refs} == {"editserve-secrets"}
    config = by_kind(objects, "ConfigMap")["editserve-config"]["data"]
    assert not {k for k in config if re.search(r"SECRET|TOKEN|PASSWORD|REDIS_URL", k)}


def test_network_policies_keep_user_url_egress_off_private_addresses(rendered):
    _, objects = rendered
    policies = by_kind(objects, "NetworkPolicy")
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    public = policies["public-egress-only"]["spec"]
    (expr,) = public["podSelector"]["matchExpressions"]
    assert {"gateway", "webhooks"} <= set(expr["values"])  # URL fetches and webhook deliveries
    blocks = [peer["ipBlock"] for rule in public["egress"] for peer in rule["to"]]
    v4 = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert PRIVATE_V4 <= set(v4["except"])
    v6 = next(b for b in blocks if b["cidr"] == "::/0")
    assert {"fc00::/7", "fe80::/10", "::1/128"} <= set(v6["except"])
    # No other policy opens the user-URL senders to arbitrary private addresses.
    for name, pol in policies.items():
        for rule in pol["spec"].get("egress", []):
            for peer in rule.get("to", []):
                cidr = peer.get("ipBlock", {}).get("cidr")
                if cidr and name != "public-egress-only":
                    assert rule.get("ports"), f"{name}: {cidr} open on every port"


# -------------------------------------------------------------------------------------------- monitoring

def test_prometheus_rule_is_generated_from_the_rule_files_and_monitors_cover_every_component():
    sys.path.insert(0, str(K8S))
    try:
        import generate
    finally:
        sys.path.pop(0)
    committed = (K8S / "components/monitoring/prometheusrule.yaml").read_text()
    assert committed == generate.prometheus_rule(), "run: python deploy/k8s/generate.py"
    objects = render("gpu")
    services = by_kind(objects, "Service")
    monitors = by_kind(objects, "ServiceMonitor")
    for component in ("gateway", "webhooks", "worker"):
        monitor = next(m for m in monitors.values()
                       if m["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == component)
        port = monitor["spec"]["endpoints"][0]["port"]
        assert any(s["metadata"]["labels"].get("app.kubernetes.io/component") == component
                   and port in {p["name"] for p in s["spec"]["ports"]} for s in services.values()), component
    assert "dcgm-exporter" in monitors
