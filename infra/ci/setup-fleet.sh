#!/usr/bin/env bash
# CI: build the images tests/fleet/ runs several hosts on one VM with (after setup-docker.sh):
#   cumulus-fleet-node:latest      a nested Docker engine (infra/fleet/node), one per "host"
#   cumulus-fleet-registry:latest  Debian's docker-registry without its auth section
#                                  (infra/fleet/registry)
# Both are FROM the local base image; this script builds that first when it is missing
# (infra/images/build-base.sh skips when it exists): `setup-fleet.sh` sorts before
# `setup-images.sh` in .ci/run's loop. Idempotent: an image whose inputs (its directory and
# the base image's ID) did not change is skipped (~0.2 s). Every step is bounded in time.
# Usage: infra/ci/setup-fleet.sh [--force]
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE=cumulus-base:bookworm
FORCE=0
[ "${1:-}" != --force ] || FORCE=1
say() { printf '[setup-fleet %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

timeout 10 docker info >/dev/null 2>&1 || { say "no working docker engine; run infra/ci/setup-docker.sh first"; exit 1; }
timeout 900 bash infra/images/build-base.sh >/dev/null
base_id=$(docker image inspect --format '{{.Id}}' "$BASE")

build() {  # build NAME DIR
    local tag=$1 dir=$2 hash have t
    hash=$( (echo "$BASE $base_id"; cd "$dir" && find . -type f -print | LC_ALL=C sort | xargs sha256sum) \
            | sha256sum | cut -c1-16)
    have=$(docker image inspect --format '{{index .Config.Labels "cumulus.inputs"}}' "$tag" 2>/dev/null || true)
    if [ "$FORCE" = 0 ] && [ "$have" = "$hash" ]; then
        say "$tag is up to date (inputs $hash)"
        return
    fi
    t=$(date +%s.%N)
    DOCKER_BUILDKIT=0 timeout 600 docker build --quiet --build-arg "BASE=$BASE" \
        --label "cumulus.inputs=$hash" -t "$tag" "$dir" >/dev/null
    say "built $tag in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}')"
}

build cumulus-fleet-node:latest infra/fleet/node
build cumulus-fleet-registry:latest infra/fleet/registry

# Smoke checks: the node image has dockerd, the registry image its binary and our config.
timeout 60 docker run --rm --entrypoint dockerd cumulus-fleet-node:latest --version >/dev/null
timeout 60 docker run --rm --entrypoint sh cumulus-fleet-registry:latest \
    -c '! grep -q "^auth:" /etc/docker/registry/config.yml && docker-registry --version' >/dev/null
say "fleet images ready"
