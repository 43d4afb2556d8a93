#!/usr/bin/env bash
# Bring up a working Docker engine and a single-node Swarm on this machine.
#
# Idempotent: every step is skipped when its result is already there.
#   1. engine: if `docker info` fails, install docker.io (only if dockerd is
#      missing) and start dockerd in the background (log + pid file below);
#      wait (bounded) for `docker info`.
#   2. swarm: if Swarm is not active, `docker swarm init --advertise-addr ...`.
#
# Env overrides:
#   CUMULUS_DOCKERD_LOG   (default /var/log/cumulus-dockerd.log)
#   CUMULUS_DOCKERD_PID   (default /var/run/cumulus-dockerd.pid)
#   CUMULUS_DOCKER_WAIT   seconds to wait for the engine (default 60)
#   CUMULUS_SWARM_ADDR    swarm advertise address (default 127.0.0.1)
#   CUMULUS_NO_SWARM=1    skip the swarm step
# Needs root (apt-get, dockerd).
set -euo pipefail

LOG=${CUMULUS_DOCKERD_LOG:-/var/log/cumulus-dockerd.log}
PIDFILE=${CUMULUS_DOCKERD_PID:-/var/run/cumulus-dockerd.pid}
WAIT=${CUMULUS_DOCKER_WAIT:-60}
ADDR=${CUMULUS_SWARM_ADDR:-127.0.0.1}

say() { printf '[setup-docker %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

engine_ok() { timeout 10 docker info >/dev/null 2>&1; }

# apt-get update at most once per run.
APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        t=$(now); say "apt-get update"
        DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq
        APT_UPDATED=1; say "apt-get update done ($(took "$t"))"
    fi
    t=$(now); say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    say "installed $* ($(took "$t"))"
}

# A pid file is "live" only if its process exists and really is dockerd.
dockerd_pid_live() {
    [ -s "$PIDFILE" ] || return 1
    local pid; pid=$(cat "$PIDFILE")
    [ -d "/proc/$pid" ] && grep -q dockerd "/proc/$pid/comm" 2>/dev/null
}

start_engine() {
    if ! command -v dockerd >/dev/null 2>&1; then
        # docker.io brings dockerd, containerd, runc, tini (docker-init).
        # --no-install-recommends skips apparmor/cgroupfs-mount etc. which we do not need;
        # a docker client may already sit in /usr/local/bin and keeps precedence on PATH.
        apt_install docker.io
    fi
    if dockerd_pid_live; then
        say "dockerd already running (pid $(cat "$PIDFILE")), waiting for it"
    else
        # A stale pid file from a killed dockerd would make the next dockerd refuse to start.
        rm -f /var/run/docker.pid
        say "starting dockerd (log: $LOG)"
        mkdir -p "$(dirname "$LOG")"
        # setsid: detach from this shell's process group so the engine outlives the script.
        setsid dockerd >>"$LOG" 2>&1 </dev/null &
        echo $! >"$PIDFILE"
    fi
    local t; t=$(now)
    local deadline=$(( $(date +%s) + WAIT ))
    until engine_ok; do
        if ! dockerd_pid_live; then
            say "dockerd exited; last log lines:"; tail -n 30 "$LOG" >&2 || true
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            say "engine not ready after ${WAIT}s; last log lines:"; tail -n 30 "$LOG" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    say "engine ready ($(took "$t") after start)"
}

T0=$(now)
if engine_ok; then
    say "docker engine already working"
else
    start_engine
fi
say "engine: $(docker version --format 'server {{.Server.Version}} api {{.Server.APIVersion}}' 2>/dev/null)," \
    "$(docker info --format 'storage {{.Driver}} cgroup v{{.CgroupVersion}} ({{.CgroupDriver}})' 2>/dev/null)"

if [ "${CUMULUS_NO_SWARM:-0}" != 1 ]; then
    state=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown)
    if [ "$state" = active ]; then
        say "swarm already active (node $(docker info --format '{{.Swarm.NodeID}}'))"
    else
        t=$(now)
        timeout 60 docker swarm init --advertise-addr "$ADDR" >/dev/null
        say "swarm initialised on $ADDR (node $(docker info --format '{{.Swarm.NodeID}}'), $(took "$t"))"
    fi
fi
say "done ($(took "$T0") total)"
