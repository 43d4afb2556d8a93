#!/usr/bin/env bash
# The GPU check's pack: the project's runtime files, the check, and the few distributions it
# imports, installed with `pip install --target`; built where a package registry is reachable,
# copied to a machine with an NVIDIA GPU, unpacked and run there with scripts/gpu-check.sh.
#
#   scripts/gpu-pack.sh [OUT]    (default dist/cumulus-gpu-check.tar.gz)
#
# PYTHON (default python3) must be the same minor version as the GPU machine's python3: the
# compiled wheels (msgspec, PyYAML, cffi) are built for one. The pack must stay under 64 MiB.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/dist/cumulus-gpu-check.tar.gz}
python=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pack=$stage/cumulus-gpu-check
mkdir -p "$pack"

cd "$root"
"$python" scripts/gpu_pack.py files "$root" >"$stage/files"
tar -cf - -T "$stage/files" | tar -xf - -C "$pack"
"$python" scripts/gpu_pack.py requirements >"$pack/requirements.txt"
"$python" -m pip install --quiet --disable-pip-version-check --no-compile \
    --prefer-binary --target "$pack/site" -r "$pack/requirements.txt"
"$python" scripts/gpu_pack.py prune "$pack/site"
"$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' >"$pack/python-version"

mkdir -p "$(dirname "$out")"
tar -C "$stage" -czf "$out" cumulus-gpu-check
"$python" scripts/gpu_pack.py size "$out"
echo "gpu-pack: $out ($(du -sh "$pack" | cut -f1) unpacked)"
