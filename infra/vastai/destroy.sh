#!/usr/bin/env bash
# Give the instance back (the seed's dev-stop.sh): `vastai destroy instance`, remove its Docker
# context, forget the state file. Its Swarm node, if it joined one, is removed on the manager
# with --swarm (`docker node rm --force`, run where `docker` reaches a manager).
#
#   infra/vastai/destroy.sh [--state FILE | --instance ID] [--swarm NODE] [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
common_options "$@"
NODE=""
set -- "${REST[@]+"${REST[@]}"}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --swarm) NODE=$2; shift ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done
load_state
need vastai "pip install vastai"
[[ -z $NODE ]] || run docker node rm --force "$NODE"
run vastai destroy instance "$INSTANCE_ID"
if [[ $DRY_RUN == 1 ]] || docker context inspect "vast-$NAME" >/dev/null 2>&1; then
    [[ $DRY_RUN == 1 ]] || [[ $(docker context show) != "vast-$NAME" ]] || run docker context use default
    run docker context rm --force "vast-$NAME"
fi
if [[ -f $STATE || $DRY_RUN == 1 ]]; then run rm -f "$STATE"; fi
say "instance $INSTANCE_ID destroyed"
