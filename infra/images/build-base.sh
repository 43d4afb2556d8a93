#!/usr/bin/env bash
# Build the local Python base image `cumulus-base:bookworm` without any registry:
# Debian's mmdebstrap writes a minimal bookworm rootfs as a tar to stdout and
# `docker import` turns it into an image.  Packages come from the Debian mirror
# configured in this host's apt sources (the only network the build needs).
#
# Usage: infra/images/build-base.sh [--force] [--tag NAME:TAG] [--suite SUITE]
#   --force   rebuild even if the image already exists
# Env: CUMULUS_BASE_MIRROR  Debian mirror URL (default: mmdebstrap's own default,
#                           deb.debian.org with -updates and -security)
# Prints the image ID on stdout (last line).  Needs root and a working engine
# (infra/ci/setup-docker.sh).
set -euo pipefail

TAG=cumulus-base:bookworm
SUITE=bookworm
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --tag) TAG=$2; shift ;;
        --suite) SUITE=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[build-base %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

timeout 10 docker info >/dev/null 2>&1 || { say "no working docker engine; run infra/ci/setup-docker.sh first"; exit 1; }

if [ "$FORCE" = 0 ] && docker image inspect "$TAG" >/dev/null 2>&1; then
    say "$TAG already exists (use --force to rebuild)"
    docker image inspect --format '{{.Id}}' "$TAG"
    exit 0
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
    t=$(now); say "installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq mmdebstrap >/dev/null
    say "mmdebstrap installed ($(took "$t"))"
fi

# No mirror argument: mmdebstrap then uses deb.debian.org with the suite plus its
# -updates and -security suites.  CUMULUS_BASE_MIRROR overrides (e.g. a local proxy).
MIRROR_ARGS=()
[ -z "${CUMULUS_BASE_MIRROR:-}" ] || MIRROR_ARGS=("$CUMULUS_BASE_MIRROR")

t=$(now); say "mmdebstrap $SUITE from ${CUMULUS_BASE_MIRROR:-deb.debian.org} | docker import -> $TAG"
# pipefail makes a failing mmdebstrap fail the pipeline even though docker import
# would happily import a truncated tar.
timeout 900 mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-pip,python3-venv,unzip,ca-certificates \
        --aptopt='Acquire::Retries "3"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$SUITE" - "${MIRROR_ARGS[@]}" \
  | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYTHONUNBUFFERED=1' \
        --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
        --change 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' \
        --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
        --change 'WORKDIR /' \
        --change 'CMD ["python3"]' \
        --message "cumulus base: mmdebstrap minbase $SUITE + python3" \
        - "$TAG" >/dev/null
say "imported ($(took "$t"))"

t=$(now)
out=$(timeout 60 docker run --rm "$TAG" python3 -c 'print(2+2)')
[ "$out" = 4 ] || { say "smoke test failed: got '$out'"; exit 1; }
say "smoke test ok: python3 prints 4 ($(took "$t")); size $(docker image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
docker image inspect --format '{{.Id}}' "$TAG"
