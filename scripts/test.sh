#!/usr/bin/env bash
# The one command that runs every test (CI calls it): installs what is missing, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec python3 -m pytest -q "$@"
