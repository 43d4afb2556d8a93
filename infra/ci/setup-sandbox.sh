#!/usr/bin/env bash
# Make Debian's bubblewrap (bwrap) available: the process backend runs every job in it
# (worker.sandbox: bwrap, the default; services/runner/sandbox.py, docs/runner.md).
#
# Idempotent and bounded: installs only when bwrap is missing, then checks that a sandbox
# starts (its own user, PID and network namespaces). Needs root (apt-get). util-linux's
# setpriv, which the sandbox uses to drop to the job's own uid, is part of every Debian.
set -euo pipefail

say() { printf '[setup-sandbox %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if command -v bwrap >/dev/null 2>&1; then
    say "bubblewrap already installed: $(bwrap --version)"
else
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
    say "apt-get install -y bubblewrap"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends \
        bubblewrap >/dev/null
    say "installed: $(bwrap --version)"
fi
command -v setpriv >/dev/null 2>&1 || { say "setpriv (util-linux) is missing"; exit 1; }

# The same shape of sandbox a job gets, as nobody.
links=()
for dir in /bin /sbin /lib /lib64; do
    if [ -L "$dir" ]; then links+=(--symlink "$(readlink "$dir")" "$dir"); fi
done
if out=$(timeout 30 bwrap --unshare-ipc --unshare-pid --unshare-uts --unshare-net \
    --die-with-parent --new-session --cap-add CAP_SETUID --cap-add CAP_SETGID \
    --ro-bind /usr /usr "${links[@]}" --dev /dev --proc /proc --tmpfs /tmp \
    setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs -- sh -c 'id -u; ls /proc | grep -c "^[0-9]"' 2>&1); then
    say "a sandbox starts: uid $(echo "$out" | head -n 1), $(echo "$out" | tail -n 1) process(es) in sight"
else
    say "bwrap is installed but a sandbox does not start: $out"
    exit 1
fi
