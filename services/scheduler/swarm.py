"""Swarm nodes as the scheduler sees them: the seed's node labels, state and availability.

When the runner is on Docker Swarm, the platform knows things about a worker that its own
heartbeats cannot say: an operator drained it, the manager marked it down, an operator labelled
it (`gpu.count`, `gpu.N.name`, `gpu.N.memory`, `chronos.installed`, `ssh.address`). A node is
matched to a worker by its label `cumulus.worker`, else by host name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from services.scheduler.state import SchedulerState
from shared import events as ev

log = logging.getLogger(__name__)

WORKER_LABEL = "cumulus.worker"


def observations(
    nodes: Iterable[Mapping[str, Any]], state: SchedulerState
) -> list[ev.WorkerNodeObserved]:
    """WorkerNodeObserved for every node whose view differs from what state already holds."""
    by_host = {w.hostname: w.worker_id for w in state.workers.values() if w.hostname}
    out = []
    for node in nodes:
        spec = node.get("Spec", {})
        labels = {str(k): str(v) for k, v in (spec.get("Labels") or {}).items()}
        hostname = node.get("Description", {}).get("Hostname", "")
        worker_id = labels.get(WORKER_LABEL) or by_host.get(hostname)
        worker = state.workers.get(worker_id or "")
        if worker is None:
            continue
        seen = ev.WorkerNodeObserved(
            worker_id=worker.worker_id,
            node_id=str(node.get("ID", "")),
            state=str(node.get("Status", {}).get("State", "unknown")),
            availability=str(spec.get("Availability", "active")),
            labels=labels,
        )
        if (worker.node_state, worker.node_availability, worker.node_labels) != (
            seen.state,
            seen.availability,
            seen.labels,
        ):
            out.append(seen)
    return out
