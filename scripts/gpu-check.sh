#!/usr/bin/env bash
# The GPU check (issue 17), bounded to 8 minutes: real devices through NVML, a stack on them,
# two 0.5 jobs at once, a 0.3 share's memory limit under MPS, a whole-GPU job against the
# partition table, and timings next to the seed's targets. See docs/gpu/README.md.
#
#   scripts/gpu-check.sh [--out DIR]    (report: docs/gpu/<gpu-name>.md and .json)
#
# Runs from a checkout with its .venv, or from an unpacked scripts/gpu-pack.sh pack (its
# site/ on PYTHONPATH, no registry needed). Exits non-zero if a step failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ -d site ]]; then
    python=${PYTHON:-python3}
    want=$(cat python-version 2>/dev/null || echo "")
    have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ -n "$want" && "$want" != "$have" ]]; then
        echo "gpu-check: the pack was built for Python $want, $python is $have" >&2
        exit 2
    fi
    export PYTHONPATH="$root/site:$root${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$root/site/bin:$PATH"
elif [[ -x .venv/bin/python ]]; then
    python=${PYTHON:-.venv/bin/python}
    export PATH="$root/.venv/bin:$PATH"
else
    python=${PYTHON:-python3}
fi
# A private home: the check's profiles and stack never touch the user's own.
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
export CUMULUS_HOME="$home/cumulus"
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT CUMULUS_CONFIG
rc=0
timeout --kill-after=10 480 "$python" scripts/gpu_check.py "$@" || rc=$?
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "gpu-check: stopped at the 8 minute bound; the report was not written" >&2
fi
exit "$rc"
