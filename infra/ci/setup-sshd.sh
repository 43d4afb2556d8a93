#!/usr/bin/env bash
# Make OpenSSH's sshd available for the SSH tests (tests/partitioner/): Debian's openssh-server.
#
# Idempotent and bounded: installs only when /usr/sbin/sshd is missing, and starts nothing.
# The tests start their own sshd on a spare 127.0.0.1 port with host keys, an sshd_config
# and a pid file of their own, and stop it by pid; the package's system service stays off
# (policy-rc.d below keeps apt from starting it). Needs root (apt-get).
set -euo pipefail

say() { printf '[setup-sshd %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ -x /usr/sbin/sshd ]; then
    say "sshd already installed: $(/usr/sbin/sshd -V 2>&1 | head -n 1 || true)"
else
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
    # Keep the package's maintainer scripts from starting a system-wide sshd on port 22.
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    say "apt-get install -y openssh-server"
    status=0
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        openssh-server >/dev/null || status=$?
    if [ "$created_policy" = 1 ]; then
        rm -f "$policy"
    fi
    [ "$status" = 0 ] || { say "apt-get install failed ($status)"; exit "$status"; }
    say "installed: $(/usr/sbin/sshd -V 2>&1 | head -n 1 || true)"
fi
# sshd refuses to start without its privilege-separation directory.
mkdir -p /run/sshd
chmod 0755 /run/sshd
