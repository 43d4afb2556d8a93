#!/usr/bin/env bash
# Rent a Vast.ai instance for Cumulus and record how to reach it (the seed's dev-setup.sh, real).
#
#   infra/vastai/create.sh [--offer ID | --query 'cpu_cores>=2 cpu_ram>=4 disk_space>=20']
#       [--image IMAGE] [--disk GB] [--name NAME] [--state FILE] [--wait S] [--dry-run]
#
# Without --offer, the cheapest offer matching --query (`vastai search offers ... -o dph+`).
# The instance is created with SSH (direct) and the ports a Swarm node and a NATS member need
# opened (2377, 7946 tcp+udp, 4789/udp, 4222, 6222); Vast.ai maps each to a random public port:
# ports.sh shows the map. Waits (at most --wait s, default 600) until it runs, then writes
# INSTANCE_ID, SSH_HOST, SSH_PORT, PUBLIC_IP to the state file (default .vast-instance).
# Needs the vastai CLI (`pip install vastai; vastai set api-key KEY`) and jq.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
common_options "$@"
OFFER="" QUERY='cpu_cores>=2 cpu_ram>=4 disk_space>=20 rentable=true' DISK=20 WAIT=600
IMAGE=nvidia/cuda:12.0.0-base-ubuntu22.04
PORTS='-p 2377:2377 -p 7946:7946 -p 7946:7946/udp -p 4789:4789/udp -p 4222:4222 -p 6222:6222'
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --offer) OFFER=$2; shift ;;
        --query) QUERY=$2; shift ;;
        --image) IMAGE=$2; shift ;;
        --disk) DISK=$2; shift ;;
        --wait) WAIT=$2; shift ;;
        --ports) PORTS=$2; shift ;;
        *) die "unknown argument $1 (see the header of $0)" ;;
    esac
    shift
done
need vastai "pip install vastai, then vastai set api-key KEY"
need jq "apt-get install -y jq"
[[ $DRY_RUN == 1 || ! -f $STATE ]] || die "$STATE exists (instance $(sed -n 's/^INSTANCE_ID=//p' "$STATE")): destroy.sh it or give --state"

if [[ -z $OFFER ]]; then
    OFFER=$(capture '<offer-id>' vastai search offers "$QUERY" -o 'dph+' --raw | { [[ $DRY_RUN == 1 ]] && cat || jq -r '.[0].id // empty'; })
    [[ -n $OFFER ]] || die "no offer matches: $QUERY"
fi
created=$(capture '{"new_contract": "<instance-id>"}' vastai create instance "$OFFER" --image "$IMAGE" \
    --disk "$DISK" --ssh --direct --label "$NAME" --env "$PORTS" --raw)
if [[ $DRY_RUN == 1 ]]; then
    INSTANCE_ID='<instance-id>'
else
    INSTANCE_ID=$(jq -r '.new_contract // empty' <<<"$created")
    [[ -n $INSTANCE_ID ]] || die "vastai create instance failed: $created"
fi
say "instance $INSTANCE_ID created; waiting until it runs (at most $WAIT s)"

info='{"actual_status": "running", "ssh_host": "<ssh-host>", "ssh_port": "<ssh-port>", "public_ipaddr": "<public-ip>"}'
began=$SECONDS
while true; do
    info=$(capture "$info" vastai show instance "$INSTANCE_ID" --raw)
    [[ $DRY_RUN == 1 ]] && break
    [[ $(jq -r '.actual_status // empty' <<<"$info") != running ]] || break
    ((SECONDS - began < WAIT)) || die "instance $INSTANCE_ID not running after $WAIT s: vastai show instance $INSTANCE_ID; destroy.sh --instance $INSTANCE_ID"
    sleep 10
done
if [[ $DRY_RUN == 1 ]]; then
    SSH_HOST='<ssh-host>' SSH_PORT='<ssh-port>' PUBLIC_IP='<public-ip>'
else
    SSH_HOST=$(jq -r .ssh_host <<<"$info") SSH_PORT=$(jq -r .ssh_port <<<"$info")
    PUBLIC_IP=$(jq -r .public_ipaddr <<<"$info")
fi
state=$(printf 'NAME=%q\nINSTANCE_ID=%q\nSSH_HOST=%q\nSSH_PORT=%q\nPUBLIC_IP=%q\n' \
    "$NAME" "$INSTANCE_ID" "$SSH_HOST" "$SSH_PORT" "$PUBLIC_IP")
if [[ $DRY_RUN == 1 ]]; then
    show install -m 0600 /dev/stdin "$STATE"; sed 's/^/    | /' <<<"$state" >&2
else
    install -m 0600 /dev/stdin "$STATE" <<<"$state"
fi
say "ssh -p $SSH_PORT root@$SSH_HOST; next: context.sh, ports.sh, onboard.sh"
