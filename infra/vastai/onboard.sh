#!/usr/bin/env bash
# Make the instance a Cumulus worker: copy setup-worker.sh, its unit, the package and the
# worker's credentials bundle there, then run setup-worker.sh on it (docs/deploy.md).
#
#   infra/vastai/onboard.sh --package cumulus-0.1.0-py3-none-any.whl --credentials DIR/credentials.json \
#       [--state FILE] [--dry-run] -- --manager HOST:2377 --token TOKEN --nats-url URLS --worker-id ID ...
#
# The credentials file and every file beside it (its TLS files, as `cumulus users add --out`
# writes them) go to /root/cumulus-onboard/creds/. Everything after `--` goes to setup-worker.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=() setup=()
for ((i = 1; i <= $#; i++)); do
    if [[ ${!i} == -- ]]; then setup=("${@:i+1}"); break; fi
    args+=("${!i}")
done
common_options "${args[@]+"${args[@]}"}"
PACKAGE="" CREDENTIALS=""
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --package) PACKAGE=$2; shift ;;
        --credentials) CREDENTIALS=$2; shift ;;
        *) die "unknown argument $1 (setup-worker.sh's options go after --)" ;;
    esac
    shift
done
[[ -n $PACKAGE && -n $CREDENTIALS ]] || die "give --package WHEEL and --credentials FILE"
load_state
need ssh "apt-get install -y openssh-client"
DEST=/root/cumulus-onboard
remote mkdir -p "$DEST/systemd" "$DEST/creds"
run scp "${SSH_OPTS[@]}" -P "$SSH_PORT" "$HERE/setup-worker.sh" "root@$SSH_HOST:$DEST/"
run scp "${SSH_OPTS[@]}" -P "$SSH_PORT" "$HERE/systemd/cumulus-worker.service" "root@$SSH_HOST:$DEST/systemd/"
run scp "${SSH_OPTS[@]}" -P "$SSH_PORT" "$PACKAGE" "root@$SSH_HOST:$DEST/"
run scp "${SSH_OPTS[@]}" -P "$SSH_PORT" -r "$(dirname "$CREDENTIALS")/." "root@$SSH_HOST:$DEST/creds/"
remote chmod -R go-rwx "$DEST/creds"
remote bash "$DEST/setup-worker.sh" --package "$DEST/$(basename "$PACKAGE")" \
    --credentials "$DEST/creds/$(basename "$CREDENTIALS")" "${setup[@]+"${setup[@]}"}"
