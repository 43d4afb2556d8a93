#!/usr/bin/env bash
# Build the local Python base image `cumulus-base:bookworm` without any registry:
# Debian's mmdebstrap writes a minimal bookworm rootfs as a tar to stdout and
# `docker import` turns it into an image.  Packages come from the Debian mirrors
# configured in this host's apt sources (the only network the build needs): every
# `deb` source for SUITE, SUITE-updates or SUITE-security in /etc/apt/sources.list
# and /etc/apt/sources.list.d/ (one-line and deb822 formats) is handed to mmdebstrap.
#
# Usage: infra/images/build-base.sh [--force] [--tag NAME:TAG] [--suite SUITE]
#   --force   rebuild even if the image already exists
# Env: CUMULUS_BASE_MIRROR  Debian mirror URL (default: this host's apt sources; if
#                           they name none for SUITE, mmdebstrap's own default)
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

# The host's own apt sources for SUITE (one `deb URI SUITE COMPONENTS` line each).
host_sources() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v s="$SUITE" '$1 == "deb" && $2 !~ /^\[/ && ($3 == s || $3 == s"-updates" || $3 == s"-security") {
            line = "deb " $2 " " $3; for (i = 4; i <= NF; i++) line = line " " $i; print line }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas: Types, URIs, Suites, Components (blank line between stanzas).
        awk -v s="$SUITE" '
            function flush(  n, m, i, j, u, x) {
                if (types ~ /(^| )deb( |$)/ && enabled != "no") {
                    n = split(uris, u, " "); m = split(suites, x, " ")
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (x[j] == s || x[j] == s"-updates" || x[j] == s"-security")
                            print "deb " u[i] " " x[j] " " comps
                }
                types = uris = suites = comps = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { $1 = ""; types = substr($0, 2) }
            tolower($1) == "uris:" { $1 = ""; uris = substr($0, 2) }
            tolower($1) == "suites:" { $1 = ""; suites = substr($0, 2) }
            tolower($1) == "components:" { $1 = ""; comps = substr($0, 2) }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { flush() }' "$f"
    done
}

# CUMULUS_BASE_MIRROR overrides (e.g. a local proxy); else the host's sources; else
# mmdebstrap's default (the suite plus its -updates and -security suites).
MIRROR_ARGS=()
if [ -n "${CUMULUS_BASE_MIRROR:-}" ]; then
    MIRROR_ARGS=("$CUMULUS_BASE_MIRROR")
else
    mapfile -t MIRROR_ARGS < <(host_sources | awk '!seen[$0]++')
fi
[ "${#MIRROR_ARGS[@]}" -gt 0 ] && say "sources: ${MIRROR_ARGS[*]}" || say "sources: mmdebstrap's default"

t=$(now); say "mmdebstrap $SUITE | docker import -> $TAG"
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
