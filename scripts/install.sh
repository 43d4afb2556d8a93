#!/usr/bin/env bash
# Create .venv and install Cumulus with its test dependencies (idempotent, quiet when done).
# As root with apt, also Debian's bubblewrap: the process backend runs every job in it
# (worker.sandbox: bwrap, docs/runner.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.cumulus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
    touch "$stamp"
fi
# Every job is a fresh interpreter that imports the in-job runner: compiled once here, so no
# job compiles it (with PYTHONDONTWRITEBYTECODE set, none would ever write it).
.venv/bin/python -m compileall -q job_image >/dev/null || true
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash infra/ci/setup-sandbox.sh || echo "[install] could not install bubblewrap" >&2
fi
