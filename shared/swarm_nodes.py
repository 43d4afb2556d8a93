"""The Swarm's nodes as the local engine (a manager) lists them: the one place that asks.

The scheduler reads their state, availability and labels; the partitioner in SSH mode reads
the `ssh.address` labels of agentless workers. Any failure (no engine, not a manager) is
logged and means "no nodes", never a crash.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


def node_attrs(timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every node's `attrs` (`ID`, `Spec`, `Description`, `Status`); [] when there is none.

    Blocking (the Docker SDK): call it in a thread, or use `list_nodes`.
    """
    try:
        import docker

        client = docker.from_env(timeout=max(1, int(timeout)))
        try:
            return [node.attrs for node in client.nodes.list()]
        finally:
            client.close()
    except Exception as exc:
        log.warning("cannot read Swarm nodes", extra={"fields": {"error": repr(exc)}})
        return []


async def list_nodes(timeout: float = 5.0) -> list[dict[str, Any]]:
    """`node_attrs` without blocking the event loop."""
    return await asyncio.to_thread(node_attrs, timeout)
