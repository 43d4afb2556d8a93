#!/usr/bin/env bash
# A Docker context for the instance's engine over SSH (the seed's step 2): `docker --context
# vast-NAME ...` then runs there. Idempotent: an existing context of that name is updated.
#
#   infra/vastai/context.sh [--name NAME] [--state FILE] [--use] [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
common_options "$@"
USE=0
for arg in "${REST[@]+"${REST[@]}"}"; do
    case $arg in --use) USE=1 ;; *) die "unknown argument $arg" ;; esac
done
load_state
need docker "install the Docker CLI"
CONTEXT=vast-$NAME
HOST="host=ssh://root@$SSH_HOST:$SSH_PORT"
if [[ $DRY_RUN == 0 ]] && docker context inspect "$CONTEXT" >/dev/null 2>&1; then
    run docker context update "$CONTEXT" --docker "$HOST"
else
    run docker context create "$CONTEXT" --docker "$HOST" --description "Vast.ai instance $INSTANCE_ID"
fi
[[ $USE == 0 ]] || run docker context use "$CONTEXT"
say "docker --context $CONTEXT info   # the instance's engine"
