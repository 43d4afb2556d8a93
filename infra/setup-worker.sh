#!/usr/bin/env bash
# setup-worker.sh: onboard one GPU host as a Cumulus worker, in one command (docs/deploy.md).
#
#   infra/setup-worker.sh --manager 10.0.0.1:2377 --token SWMTKN-1-... \
#       --nats-url tls://10.0.0.1:4222,tls://10.0.0.2:4222,tls://10.0.0.3:4222 \
#       --worker-id gpu-7 --credentials gpu-7/credentials.json --package cumulus-0.1.0-py3-none-any.whl \
#       [--backend swarm] [--verify-profile observer.json]
#
# The seed's form `setup-worker.sh MANAGER TOKEN [options]` works too.
#
# Steps, each skipped when its result is already there (a rerun changes nothing and exits 0):
#   1. the Docker engine: `apt-get update; apt-get install -y docker.io` if `docker` is missing,
#      then (systemd) `systemctl enable --now docker`;
#   2. the Swarm: `docker swarm join --token TOKEN MANAGER`, unless this engine is already in
#      the swarm MANAGER belongs to (in another one: an error, never a silent leave);
#   3. the GPUs: `chronos_cli --json stats` (the same devices the partitioner will use), and the
#      node's labels, the seed's: gpu.count, gpu.N.name, gpu.N.memory (MiB), chronos.installed,
#      plus cumulus.worker (how the scheduler matches node and worker); labels of devices that
#      are gone are removed. Labels are set through a manager's engine: this one when it is a
#      manager, else --manager-engine (a DOCKER_HOST, e.g. ssh://root@10.0.0.1);
#   4. the package into a venv (--venv, default /opt/cumulus/venv), reinstalled only when the
#      wheel (or source directory) changed;
#   5. /etc/cumulus/config.yaml (0644) and credentials.json (0600), TLS files under
#      /etc/cumulus/tls (keys 0600), from the credentials bundle the operator made;
#   6. the unit cumulus-worker.service (infra/systemd/), enabled and started; restarted when
#      anything it runs changed. --no-systemd instead starts `cumulus worker` in the background
#      with its pid in /run/cumulus-worker.pid (machines without systemd as PID 1, tests);
#   7. verify: until the scheduler lists the worker as ready (`cumulus workers`, with
#      --verify-profile: an observer's or operator's credentials), at most --timeout seconds;
#      without a profile, until the agent says it runs (its consumers were made by the
#      scheduler).
#
# --dry-run prints every command it would run (and the files it would write) and runs none: it
# shows the path of a fresh host. --root DIR puts every file under DIR (tests).
# Exit: 0 done; 1 a step failed (the message says which and what to do); 2 bad usage.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
UNIT_TEMPLATE=$HERE/systemd/cumulus-worker.service

MANAGER="" TOKEN="" NATS_URL="" WORKER_ID="" CREDENTIALS="" PACKAGE=""
BACKEND=process DEVICE_SOURCE=auto DEVICES="" MANAGER_ENGINE="" ADVERTISE_ADDR=""
VERIFY_PROFILE="" TIMEOUT=120 ROOT="" VENV="" DATA_DIR="" PIP_ARGS="" PYTHON=python3
DRY_RUN=0 SYSTEMD=1

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    cat >&2 <<'EOF'
Options:
  --manager HOST:PORT      a Swarm manager (2377)          --token TOKEN   its worker join token
  --nats-url URLS          the NATS cluster, comma-separated (nats.url)
  --worker-id ID           this worker's id (worker.id; its identity in --credentials)
  --credentials FILE       the worker's credentials file (TLS files named in it come along)
  --package WHEEL|DIR      the Cumulus package to install
  --backend B              process | docker | swarm | auto (worker.backend; default process)
  --device-source S        auto | nvidia | opencl | virtual (default auto)
  --devices SPEC           virtual devices, e.g. 2x16GiB (implies --device-source virtual)
  --manager-engine URL     a manager's Docker engine for the node labels (DOCKER_HOST form)
  --advertise-addr ADDR    the address this node advertises to the Swarm
  --verify-profile FILE    credentials allowed to list workers (observer/admin) for the check
  --timeout S              how long the check waits (default 120)
  --venv DIR  --data-dir DIR  --pip-args "ARGS" (e.g. "--no-index --find-links /wheels")
  --root DIR               prefix of every path written (tests)
  --no-systemd             run the agent in the background, pid in <root>/run/cumulus-worker.pid
  --dry-run                print the commands, run none
EOF
    exit 2
}

die() { printf 'setup-worker: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'setup-worker: %s\n' "$*" >&2; }

# -- arguments -----------------------------------------------------------------------------
if [[ $# -ge 2 && $1 != -* && $2 != -* ]]; then MANAGER=$1 TOKEN=$2; shift 2; fi
while [[ $# -gt 0 ]]; do
    case $1 in
        --manager) MANAGER=$2; shift ;;
        --token) TOKEN=$2; shift ;;
        --nats-url) NATS_URL=$2; shift ;;
        --worker-id) WORKER_ID=$2; shift ;;
        --credentials) CREDENTIALS=$2; shift ;;
        --package) PACKAGE=$2; shift ;;
        --backend) BACKEND=$2; shift ;;
        --device-source) DEVICE_SOURCE=$2; shift ;;
        --devices) DEVICES=$2; DEVICE_SOURCE=virtual; shift ;;
        --manager-engine) MANAGER_ENGINE=$2; shift ;;
        --advertise-addr) ADVERTISE_ADDR=$2; shift ;;
        --verify-profile) VERIFY_PROFILE=$2; shift ;;
        --timeout) TIMEOUT=$2; shift ;;
        --root) ROOT=$2; shift ;;
        --venv) VENV=$2; shift ;;
        --data-dir) DATA_DIR=$2; shift ;;
        --pip-args) PIP_ARGS=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --no-systemd) SYSTEMD=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage ;;
        *) printf 'setup-worker: unknown argument %q\n' "$1" >&2; usage ;;
    esac
    shift
done

missing=()
for name in MANAGER TOKEN NATS_URL WORKER_ID CREDENTIALS PACKAGE; do
    [[ -n ${!name} ]] || missing+=("--$(tr 'A-Z_' 'a-z-' <<<"$name")")
done
[[ ${#missing[@]} -eq 0 ]] || { printf 'setup-worker: missing %s\n' "${missing[*]}" >&2; usage; }
[[ $WORKER_ID =~ ^[A-Za-z0-9_-]+$ ]] || die "worker id '$WORKER_ID': use letters, digits, '-' and '_'"
case $BACKEND in process|docker|swarm|auto) ;; *) die "--backend $BACKEND: one of process, docker, swarm, auto" ;; esac
case $DEVICE_SOURCE in auto|nvidia|opencl|virtual) ;; *) die "--device-source $DEVICE_SOURCE: one of auto, nvidia, opencl, virtual" ;; esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout $TIMEOUT: whole seconds"
if [[ -n $ROOT ]]; then
    [[ $ROOT == /* ]] || die "--root $ROOT: an absolute path"
    ROOT=${ROOT%/}
fi
ETC=$ROOT/etc/cumulus
VENV=${VENV:-$ROOT/opt/cumulus/venv}
DATA_DIR=${DATA_DIR:-$ROOT/var/lib/cumulus}
UNIT=$ROOT/etc/systemd/system/cumulus-worker.service
PIDFILE=$ROOT/run/cumulus-worker.pid
AGENT_LOG=$ROOT/var/log/cumulus-worker.log
CONFIG=$ETC/config.yaml
CHANGED=0  # anything the agent runs with changed: it is (re)started

# -- running commands ------------------------------------------------------------------------
show() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; }  # like `set -x`
run() { show "$@"; [[ $DRY_RUN == 1 ]] || "$@"; }
# A file's content (stdin) at PATH with MODE; a rerun with the same content changes nothing.
put() {
    local mode=$1 path=$2 content
    content=$(cat)
    if [[ $DRY_RUN == 1 ]]; then
        show install -D -m "$mode" /dev/stdin "$path"
        printf '%s\n' "$content" | sed 's/^/    | /' >&2
        CHANGED=1  # a dry run shows a fresh host
        return
    fi
    if [[ -f $path ]] && [[ $(stat -c %a "$path") == "${mode#0}" ]] \
        && cmp -s "$path" <(printf '%s\n' "$content"); then
        return
    fi
    show install -D -m "$mode" /dev/stdin "$path"
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" | install -D -m "$mode" /dev/stdin "$path"
    CHANGED=1
}
# A copy of SRC at DEST with MODE, only when it differs.
copy() {
    local mode=$1 src=$2 dest=$3
    if [[ $DRY_RUN == 0 && -f $dest ]] && cmp -s "$src" "$dest" \
        && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
        return
    fi
    run install -D -m "$mode" "$src" "$dest"
    CHANGED=1
}
yq() { local v=${1//\\/\\\\}; printf '"%s"' "${v//\"/\\\"}"; }  # a YAML (JSON) string

# -- 1. the Docker engine ----------------------------------------------------------------------
docker_engine() {
    if [[ $DRY_RUN == 0 ]] && command -v docker >/dev/null && timeout 20 docker info >/dev/null 2>&1; then
        say "docker engine: running"
        return
    fi
    if [[ $DRY_RUN == 1 ]] || ! command -v docker >/dev/null; then
        run env DEBIAN_FRONTEND=noninteractive apt-get update
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io
    fi
    if [[ $SYSTEMD == 1 ]]; then
        run systemctl enable --now docker
    elif [[ $DRY_RUN == 0 ]]; then
        die "the Docker engine does not answer and --no-systemd was given: start dockerd (infra/ci/setup-docker.sh)"
    fi
    [[ $DRY_RUN == 1 ]] || timeout 60 bash -c 'until docker info >/dev/null 2>&1; do sleep 1; done' \
        || die "the Docker engine did not answer within 60 s: see journalctl -u docker"
}

# -- 2. the Swarm ----------------------------------------------------------------------------
swarm_join() {
    local state managers join=(docker swarm join --token "$TOKEN")
    [[ -z $ADVERTISE_ADDR ]] || join+=(--advertise-addr "$ADVERTISE_ADDR")
    join+=("$MANAGER")
    if [[ $DRY_RUN == 1 ]]; then
        show docker info --format '{{.Swarm.LocalNodeState}}'
        run "${join[@]}"
        return
    fi
    state=$(docker info --format '{{.Swarm.LocalNodeState}}')
    if [[ $state == active ]]; then
        managers=$(docker info --format '{{range .Swarm.RemoteManagers}}{{.Addr}} {{end}}')
        if [[ " $managers " == *" $MANAGER "* ]]; then
            say "swarm: already a node of the swarm of $MANAGER"
            return
        fi
        die "this engine is in another swarm (managers: ${managers:-none}); leave it first (docker swarm leave) or give that swarm's manager"
    fi
    [[ $state == inactive ]] || die "swarm state '$state': wait until it settles (docker info), then rerun"
    run "${join[@]}" >/dev/null || die "docker swarm join $MANAGER failed: check the token and that ports 2377, 7946, 4789 reach the manager"
    CHANGED=1
}

# -- 3. GPUs and node labels -------------------------------------------------------------------
chronos_options() {
    local opts=(--json --state-dir "$DATA_DIR/chronos-$WORKER_ID" --backend "$DEVICE_SOURCE")
    [[ -z $DEVICES ]] || opts+=(--devices "$DEVICES")
    printf '%s\n' "${opts[@]}"
}

# The wanted labels, one key=value a line, from `chronos_cli stats` (JSON on stdin).
labels_of_stats() {
    "$VENV/bin/python" -c '
import json, sys
devices = json.load(sys.stdin)["devices"]
print(f"gpu.count={len(devices)}")
for d in devices:
    i, name, mib = d["index"], d["name"], d["memory_bytes"] // (1024 * 1024)
    print(f"gpu.{i}.name={name}")
    print(f"gpu.{i}.memory={mib}")
print("chronos.installed=true")
print(f"cumulus.worker={sys.argv[1]}")
' "$WORKER_ID"
}

label_node() {
    local -a opts ctl=(docker) update=()
    mapfile -t opts < <(chronos_options)
    [[ -z $MANAGER_ENGINE ]] || ctl=(docker -H "$MANAGER_ENGINE")
    if [[ $DRY_RUN == 1 ]]; then
        show "$VENV/bin/chronos_cli" "${opts[@]}" stats
        show docker info --format '{{.Swarm.NodeID}}'
        run "${ctl[@]}" node update --label-add gpu.count='<devices>' --label-add gpu.0.name='<name>' \
            --label-add gpu.0.memory='<MiB>' --label-add chronos.installed=true \
            --label-add cumulus.worker="$WORKER_ID" '<node-id>'
        return
    fi
    local stats node current wanted key value
    stats=$("$VENV/bin/chronos_cli" "${opts[@]}" stats) \
        || die "chronos_cli stats failed: $stats"
    node=$(docker info --format '{{.Swarm.NodeID}}')
    if [[ -z $MANAGER_ENGINE && $(docker info --format '{{.Swarm.ControlAvailable}}') != true ]]; then
        die "this node is not a Swarm manager: give --manager-engine (a manager's Docker engine, e.g. ssh://root@${MANAGER%:*}) to label it"
    fi
    current=$("${ctl[@]}" node inspect "$node" --format '{{range $k, $v := .Spec.Labels}}{{$k}}={{$v}}{{"\n"}}{{end}}')
    wanted=$(labels_of_stats <<<"$stats")
    while IFS= read -r line; do
        [[ -n $line ]] || continue
        grep -qxF -- "$line" <<<"$current" || update+=(--label-add "$line")
    done <<<"$wanted"
    while IFS= read -r line; do
        key=${line%%=*}
        [[ $key == gpu.* ]] || continue
        grep -q "^${key//./\\.}=" <<<"$wanted" || update+=(--label-rm "$key")
    done <<<"$current"
    if [[ ${#update[@]} -eq 0 ]]; then
        say "node $node: labels up to date ($(grep -c . <<<"$wanted") labels)"
        return
    fi
    run "${ctl[@]}" node update "${update[@]}" "$node" >/dev/null
}

# -- 4. the package --------------------------------------------------------------------------
package_digest() {
    if [[ -d $PACKAGE ]]; then
        (cd "$PACKAGE" && find . \( -name '*.py' -o -name pyproject.toml -o -name '*.typed' \) \
            -not -path './.*' -not -path '*/tests/*' -print0 | LC_ALL=C sort -z \
            | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
    else
        sha256sum "$PACKAGE" | cut -d' ' -f1
    fi
}

install_package() {
    local marker=$VENV/.cumulus-package digest
    if [[ $DRY_RUN == 1 ]]; then
        run "$PYTHON" -m venv "$VENV"
        # shellcheck disable=SC2086
        run "$VENV/bin/python" -m pip install $PIP_ARGS "$PACKAGE"
        return
    fi
    [[ -e $PACKAGE ]] || die "--package $PACKAGE: no such file or directory"
    digest=$(package_digest)
    if [[ -x $VENV/bin/cumulus && -f $marker && $(cat "$marker") == "$digest" ]]; then
        say "package: $(basename "$PACKAGE") already installed in $VENV"
        return
    fi
    [[ -x $VENV/bin/python ]] || run "$PYTHON" -m venv "$VENV"
    # shellcheck disable=SC2086
    run "$VENV/bin/python" -m pip install -q $PIP_ARGS "$PACKAGE" \
        || die "pip install $PACKAGE failed (offline host? --pip-args '--no-index --find-links DIR')"
    printf '%s\n' "$digest" >"$marker"
    CHANGED=1
}

# -- 5. config and credentials ---------------------------------------------------------------
# The credentials with their TLS files renamed to tls/<name> beside them; prints src<TAB>name
# for each TLS file, then the rewritten credentials (after a line "--").
CREDS_REWRITE='
import json, os, sys
path = sys.argv[1]
creds = json.load(open(path))
tls = creds.get("tls") or {}
for field in ("ca", "cert", "key"):
    name = tls.get(field)
    if not name:
        continue
    src = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(path)), name)
    tls[field] = "tls/" + os.path.basename(src)
    print(f"{src}\t{os.path.basename(src)}")
print("--")
print(json.dumps(creds, indent=2, sort_keys=True))
'

install_credentials() {
    if [[ $DRY_RUN == 1 ]]; then
        show "$PYTHON" -c '<rename TLS files to tls/NAME>' "$CREDENTIALS"
        run install -D -m 0600 "$CREDENTIALS" "$ETC/credentials.json"
        run install -D -m 0644 '<tls ca.crt, cert>' "$ETC/tls/"
        run install -D -m 0600 '<tls key>' "$ETC/tls/"
        return
    fi
    [[ -f $CREDENTIALS ]] || die "--credentials $CREDENTIALS: no such file"
    local out src name mode files=1
    out=$("$PYTHON" -c "$CREDS_REWRITE" "$CREDENTIALS") || die "--credentials $CREDENTIALS: not a credentials file"
    while IFS=$'\t' read -r src name; do
        if [[ $src == -- ]]; then files=0; continue; fi
        [[ $files == 1 ]] || continue
        [[ -f $src ]] || die "TLS file $src named in $CREDENTIALS is missing: hand over the whole bundle (cumulus users add --out)"
        mode=0644; [[ $name == *.key ]] && mode=0600
        copy "$mode" "$src" "$ETC/tls/$name"
    done <<<"$out"
    sed '0,/^--$/d' <<<"$out" | put 0600 "$ETC/credentials.json"
    [[ -n $(sed -n '/"seed"/p' "$ETC/credentials.json") ]] \
        || die "$CREDENTIALS holds no nkey seed: make the worker's identity with its key"
}

write_config() {
    put 0644 "$CONFIG" <<EOF
# Written by infra/setup-worker.sh; rerun it to change this host (docs/deploy.md).
data_dir: $(yq "$DATA_DIR")
nats:
  url: $(yq "$NATS_URL")
  credentials: $(yq "$ETC/credentials.json")
worker:
  id: $(yq "$WORKER_ID")
  backend: $(yq "$BACKEND")
  device_source: $(yq "$DEVICE_SOURCE")${DEVICES:+
  devices: $(yq "$DEVICES")}
EOF
}

# -- 6. the agent ------------------------------------------------------------------------------
unit_text() {
    sed -e "s#/opt/cumulus/venv#$VENV#g" -e "s#/etc/cumulus#$ETC#g" "$UNIT_TEMPLATE"
}

agent_pid() {  # the pid of the agent this script started, if it still runs
    local pid
    [[ -f $PIDFILE ]] || return 1
    pid=$(cat "$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "worker --config $CONFIG" || return 1
    printf '%s\n' "$pid"
}

start_agent() {
    local pid
    unit_text | put 0644 "$UNIT"
    if [[ $SYSTEMD == 1 ]]; then
        [[ $CHANGED == 0 ]] || run systemctl daemon-reload
        run systemctl enable cumulus-worker.service
        if [[ $CHANGED == 1 ]]; then
            run systemctl restart cumulus-worker.service
        else
            run systemctl start cumulus-worker.service
        fi
        return
    fi
    if [[ $DRY_RUN == 1 ]]; then
        show setsid "$VENV/bin/cumulus" worker --config "$CONFIG" '>>' "$AGENT_LOG" '&'
        show echo '$!' '>' "$PIDFILE"
        return
    fi
    if pid=$(agent_pid); then
        if [[ $CHANGED == 0 ]]; then
            say "agent: running (pid $pid)"
            return
        fi
        run kill -TERM "$pid"
        timeout 60 tail --pid="$pid" -f /dev/null || die "the agent (pid $pid) did not stop within 60 s"
    fi
    mkdir -p "$(dirname "$PIDFILE")" "$(dirname "$AGENT_LOG")"
    show setsid "$VENV/bin/cumulus" worker --config "$CONFIG" '>>' "$AGENT_LOG" '&'
    # A clean environment, as systemd gives the unit.
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME="${HOME:-/root}" \
        LANG=C.UTF-8 setsid "$VENV/bin/cumulus" worker --config "$CONFIG" \
        >>"$AGENT_LOG" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
    say "agent: started (pid $!), log $AGENT_LOG"
}

# -- 7. verify ---------------------------------------------------------------------------------
verify() {
    local began=$SECONDS listed
    if [[ -n $VERIFY_PROFILE ]]; then
        show "$VENV/bin/cumulus" --profile "$VERIFY_PROFILE" workers --json
        [[ $DRY_RUN == 0 ]] || return 0
        while ((SECONDS - began < TIMEOUT)); do
            listed=$(env -u CUMULUS_NATS_URL "$VENV/bin/cumulus" --profile "$VERIFY_PROFILE" workers --json 2>/dev/null || true)
            if "$VENV/bin/python" -c '
import json, sys
workers = json.loads(sys.argv[1] or "{}").get("workers", [])
sys.exit(0 if any(w.get("worker_id") == sys.argv[2] and w.get("status") == "ready" for w in workers) else 1)
' "$listed" "$WORKER_ID" 2>/dev/null; then
                say "verified: the scheduler lists worker $WORKER_ID as ready ($((SECONDS - began)) s)"
                return
            fi
            agent_alive || die "the agent stopped; see $(agent_logs)"
            sleep 1
        done
        die "worker $WORKER_ID not listed by the scheduler within $TIMEOUT s; see $(agent_logs)"
    fi
    [[ $DRY_RUN == 0 ]] || return 0
    while ((SECONDS - began < TIMEOUT)); do
        if agent_says_running; then
            say "verified: the agent runs and the scheduler made its consumers (give --verify-profile to see it listed)"
            return
        fi
        agent_alive || die "the agent stopped; see $(agent_logs)"
        sleep 1
    done
    die "the agent did not start within $TIMEOUT s; see $(agent_logs)"
}

agent_alive() {
    if [[ $SYSTEMD == 1 ]]; then systemctl is-active --quiet cumulus-worker.service; else agent_pid >/dev/null; fi
}
agent_logs() {
    if [[ $SYSTEMD == 1 ]]; then echo "journalctl -u cumulus-worker"; else echo "$AGENT_LOG"; fi
}
agent_says_running() {
    if [[ $SYSTEMD == 1 ]]; then
        journalctl -u cumulus-worker.service -n 200 --no-pager 2>/dev/null | grep -q "worker agent running"
    else
        grep -q "worker agent running" "$AGENT_LOG" 2>/dev/null
    fi
}

# -- main --------------------------------------------------------------------------------------
[[ $DRY_RUN == 0 ]] || say "dry run: printing the commands of a fresh host, running none"
docker_engine
swarm_join
install_package
label_node
install_credentials
write_config
start_agent
verify
if [[ $DRY_RUN == 1 ]]; then say "dry run: nothing was run"; else say "worker $WORKER_ID is set up"; fi
