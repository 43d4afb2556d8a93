#!/usr/bin/env bash
# CI: build the base and job images offline (after setup-docker.sh brought up the engine).
# The job image carries the SDK's dependencies at the versions of the .venv the tests use
# (scripts/install.sh, idempotent), so a function the tests pickle loads in the image.
# Idempotent: each image is skipped when it is up to date.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/install.sh
timeout 900 bash infra/images/build-images.sh
