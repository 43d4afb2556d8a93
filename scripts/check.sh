#!/usr/bin/env bash
# Lint, format check, complexity ceiling and strict types: what `make check` and CI run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy shared sdk cumulus services cumulus_core job_image
