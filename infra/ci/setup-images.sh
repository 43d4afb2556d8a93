#!/usr/bin/env bash
# CI: build the base and job images offline (after setup-docker.sh brought up the engine).
# Idempotent: each image is skipped when it is up to date.
set -euo pipefail
cd "$(dirname "$0")/../.."
timeout 900 bash infra/images/build-images.sh
