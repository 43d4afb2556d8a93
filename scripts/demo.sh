#!/usr/bin/env bash
# Start the embedded Cumulus stack, run an example function on 0.5 GPU, print its logs and
# result, and stop. Needs only python3 (with venv); installs into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/cumulus demo "$@"
