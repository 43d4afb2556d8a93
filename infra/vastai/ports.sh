#!/usr/bin/env bash
# Open the ports of a Swarm node and a NATS member on the instance, and show where Vast.ai
# maps them. Inside: the instance's firewall (ufw, when it has one) allows 2377/tcp, 7946/tcp+udp,
# 4789/udp, 4222/tcp, 6222/tcp. Outside: Vast.ai maps each port opened at create (create.sh
# --ports) to a random public port; the map is printed ("4222/tcp -> 203.0.113.7:41234"), since
# remote clients and workers must use those.
#
#   infra/vastai/ports.sh [--state FILE] [--dry-run]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
common_options "$@"
[[ ${#REST[@]} -eq 0 ]] || die "unknown argument ${REST[0]}"
load_state
need vastai "pip install vastai"
need jq "apt-get install -y jq"
RULES="2377/tcp 7946/tcp 7946/udp 4789/udp 4222/tcp 6222/tcp"
remote_sh "if command -v ufw >/dev/null; then for p in $RULES; do ufw allow \$p; done; else echo 'no ufw: nothing to open inside'; fi"
info=$(capture '{"ports": {}}' vastai show instance "$INSTANCE_ID" --raw)
[[ $DRY_RUN == 1 ]] || jq -r '.ports // {} | to_entries[] | "\(.key) -> \(.value[0].HostIp):\(.value[0].HostPort)"' <<<"$info"
