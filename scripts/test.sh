#!/usr/bin/env bash
# The one command that runs every test (CI calls it): installs what is missing, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Two pytest workers, one test file each at a time (module-scoped models and stacks stay in one process). The
# suite mostly waits on subprocesses (workers, gateways, kills, restarts): one process used about one core here,
# two use both. Each worker has its own private Redis and S3 endpoint (tests/conftest.py), so they share nothing.
# EDITSERVE_TEST_WORKERS=0 runs in one process.
exec python3 -m pytest -q -n "${EDITSERVE_TEST_WORKERS:-2}" --dist loadfile "$@"
