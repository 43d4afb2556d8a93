#!/usr/bin/env bash
# Install what the observability tests run for real: Debian's `prometheus` (tests/observability/
# test_prometheus.py scrapes `cumulus up`'s /metrics ports with it) and `chromium` with
# `chromium-driver` (the web dashboard test drives a headless browser).
#
# Idempotent and bounded: installs only what is missing, starts nothing. The package's system
# service stays off (policy-rc.d below keeps apt from starting a Prometheus on :9090); the tests
# start their own on a free port, with their own storage, and stop it by pid. Needs root.
set -euo pipefail

say() { printf '[setup-observability %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ "${#missing[@]}" = 0 ]; then
    say "already installed: prometheus, chromium, chromium-driver"
    exit 0
fi
say "apt-get update"
DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
fi
say "apt-get install -y ${missing[*]}"
status=0
DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || status=$?
if [ "$created_policy" = 1 ]; then
    rm -f "$policy"
fi
[ "$status" = 0 ] || { say "apt-get install failed ($status)"; exit "$status"; }
say "installed: ${missing[*]}"
