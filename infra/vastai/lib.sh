# Shared by the infra/vastai scripts (sourced): options, dry-run, the instance's state file.
#
# Every script takes --dry-run: it prints each command it would run (`+ cmd`, shell-quoted)
# and runs none, not even the queries (their answers are shown as <placeholders>).
# The state file (--state, default .vast-instance) holds what `create.sh` learned:
# INSTANCE_ID, SSH_HOST, SSH_PORT, PUBLIC_IP, NAME. --instance/--ssh-host/--ssh-port override it.
set -euo pipefail

DRY_RUN=0
STATE=.vast-instance
NAME=cumulus-dev
INSTANCE_ID="" SSH_HOST="" SSH_PORT="" PUBLIC_IP=""
REST=()

die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }
say() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
show() { { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2; }  # like `set -x`
run() { show "$@"; [[ $DRY_RUN == 1 ]] || "$@"; }
# The output of a query; in a dry run the command is shown and PLACEHOLDER stands for it.
capture() {
    local placeholder=$1; shift
    if [[ $DRY_RUN == 1 ]]; then show "$@"; printf '%s\n' "$placeholder"; return; fi
    "$@"
}
need() { [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null || die "$1 not found: $2"; }

# Options every script shares; the rest are left in REST for the script.
common_options() {
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --state) STATE=$2; shift ;;
            --name) NAME=$2; shift ;;
            --instance) INSTANCE_ID=$2; shift ;;
            --ssh-host) SSH_HOST=$2; shift ;;
            --ssh-port) SSH_PORT=$2; shift ;;
            *) REST+=("$1") ;;
        esac
        shift
    done
}

# Read the state file (values given as options win); in a dry run, placeholders fill the gaps.
load_state() {
    local id=$INSTANCE_ID host=$SSH_HOST port=$SSH_PORT
    if [[ -f $STATE ]]; then
        # shellcheck disable=SC1090
        source "$STATE"
    elif [[ $DRY_RUN == 0 && -z $id ]]; then
        die "no $STATE: run infra/vastai/create.sh first (or give --instance)"
    fi
    INSTANCE_ID=${id:-${INSTANCE_ID:-<instance-id>}}
    SSH_HOST=${host:-${SSH_HOST:-<ssh-host>}}
    SSH_PORT=${port:-${SSH_PORT:-<ssh-port>}}
    PUBLIC_IP=${PUBLIC_IP:-<public-ip>}
}

SSH_OPTS=(-o StrictHostKeyChecking=accept-new -o ConnectTimeout=10)
# A command on the instance: its arguments quoted (remote), or one shell string (remote_sh).
remote() { remote_sh "$(printf '%q ' "$@")"; }
remote_sh() { run ssh "${SSH_OPTS[@]}" -p "$SSH_PORT" "root@$SSH_HOST" "$1"; }
