#!/bin/sh
# Start a nested dockerd in this container (a test "host" of tests/fleet/).
# /sys and the cgroup mounts come read-only into a container that is not --privileged (which
# fails on these VMs): remount them read-write, then exec dockerd listening on the unix socket
# and on tcp 0.0.0.0:2375 (--tls=false says so explicitly: without it dockerd 20.10 waits 15 s).
#
# SECURITY: plain tcp 2375 is unauthenticated root on this engine. It is only reachable on the
# test bridge network that tests/fleet/hosts.py makes (no port is published on the VM). A real
# deployment keeps dockerd on its local socket, or listens with TLS (--tlsverify, port 2376):
# see docs/deploy.md.
set -eu
mount -o remount,rw /sys 2>/dev/null || true
for m in $(awk '$3 == "cgroup" || $3 == "cgroup2" || $3 == "tmpfs" && $2 == "/sys/fs/cgroup" {print $2}' /proc/self/mounts); do
    mount -o remount,bind,rw "$m" 2>/dev/null || true
done
mkdir -p /etc/docker
[ -f /etc/docker/daemon.json ] || echo '{}' > /etc/docker/daemon.json
# Runtime state of a previous start (a host stopped and started again) goes: PIDs start from 1
# again in the new PID namespace, so the old containerd.pid may name a live process of this
# one, and dockerd then waits for a containerd that is not there ("timeout waiting for
# containerd to start"). What must persist (images, the Swarm) is in /var/lib/docker.
rm -rf /var/run/docker.pid /var/run/docker /run/containerd
exec dockerd \
    --host unix:///var/run/docker.sock \
    --host tcp://0.0.0.0:2375 --tls=false \
    --storage-driver overlay2 \
    "$@"
