#!/usr/bin/env bash
# Install what is missing into the current Python, build the tiny models. Idempotent: a stamp holding the
# hash of pyproject.toml skips pip when nothing changed (seconds), and a fresh machine gets everything.
# torch is pinned to the CPU build that lies on this kind of machine: a bare `torch` would pull CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .run
stamp=.run/bootstrap.$( (cat pyproject.toml; $PY --version) | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || ! $PY -c "import torch, diffusers, editserve, service, worker, schemathesis, playwright, xdist" 2>/dev/null \
   || ! command -v weed >/dev/null; then
  $PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
  $PY -m pip install -q --disable-pip-version-check -e ".[dev]"
  # Only its BPE merges file is used (the real CLIP tokenizer); its deps would pull torchvision.
  $PY -m pip install -q --disable-pip-version-check --no-deps "open-clip-torch==3.3.0"
  touch "$stamp"
fi
# Debian packages: Redis, Sentinel and openssl (tests/test_redis_sentinel.py), promtool (alert rules), node + npm (CRD
# validators for deploy/k8s, the TypeScript client), kubectl (kustomize renders deploy/k8s; these machines ship
# Google's kubectl package).
apt_missing=()
command -v redis-server >/dev/null || apt_missing+=(redis-server)
command -v redis-sentinel >/dev/null || apt_missing+=(redis-sentinel)
command -v promtool >/dev/null || apt_missing+=(prometheus)
command -v openssl >/dev/null || apt_missing+=(openssl)
command -v node >/dev/null || apt_missing+=(nodejs)
command -v npm >/dev/null || apt_missing+=(npm)
# Debian's chromium (and a font) for the playground's browser tests: Playwright drives it, no browser download.
command -v chromium >/dev/null || apt_missing+=(chromium fonts-dejavu-core)
if [ ${#apt_missing[@]} -gt 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${apt_missing[@]}") >/dev/null
fi
if ! command -v kubectl >/dev/null; then
  (apt-get install -y -qq kubectl || apt-get install -y -qq kubernetes-client) >/dev/null
fi
# The Debian prometheus package starts a server where an init system runs; only promtool is wanted.
if command -v service >/dev/null && service prometheus status >/dev/null 2>&1; then service prometheus stop >/dev/null || true; fi
# KEDA / prometheus-operator CRD validators (npm @kubernetes-models/*), pinned by the lock file.
if [ ! -d deploy/k8s/crd-check/node_modules/@kubernetes-models/keda ]; then
  npm ci --prefix deploy/k8s/crd-check --no-audit --no-fund --loglevel=error >/dev/null
fi
# The tiny random-weight models every test and the demo load through from_pretrained.
$PY -m worker.models.builders --tiny-root "${EDITSERVE_MODELS_DIR:-.models}" >/dev/null 2>&1 \
  || $PY -m worker.models.builders --tiny-root "${EDITSERVE_MODELS_DIR:-.models}"
# The TypeScript client's dev tools (tsc, openapi-typescript), pinned by its lock file.
ts_stamp=clients/typescript/node_modules/.stamp-$( (cat clients/typescript/package-lock.json; node --version) | sha256sum | cut -c1-16)
if [ ! -f "$ts_stamp" ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && touch "$ts_stamp"
fi
