#!/usr/bin/env bash
# The main job end to end on this machine: installs what is missing, builds the tiny models, starts
# Redis (if none listens), a local S3 endpoint, the gateway, a worker and the webhook sender, then
# submits a P2P word swap, a P2P reweight and an IP2P edit through the SDK, inverts a real photo
# (scikit-image's public-domain astronaut) and edits it by its caption, and saves the images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec python3 scripts/demo.py "$@"
