#!/usr/bin/env bash
# Start the embedded Cumulus stack, run an example function on 0.5 GPU, print its logs and
# result, and stop. Needs only python3 (with venv); installs into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Jobs run sandboxed in bubblewrap. Where it cannot be installed or does not work (not root,
# no apt), the demo opts in to an unsandboxed job explicitly, and says so.
if [ -z "${CUMULUS_WORKER_SANDBOX:-}" ] && ! why=$(.venv/bin/python -c '
from services.runner.sandbox import Sandbox
Sandbox.detect().self_test()' 2>&1); then
    echo "[demo] ${why##*ConfigError: }" >&2
    echo "[demo] running the demo job unsandboxed (CUMULUS_WORKER_SANDBOX=none);" \
        "install bubblewrap (sudo apt-get install bubblewrap) to sandbox it" >&2
    export CUMULUS_WORKER_SANDBOX=none
fi
exec .venv/bin/cumulus demo "$@"
