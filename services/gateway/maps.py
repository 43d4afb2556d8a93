"""The gateway's part in warm maps (docs/map.md): check the request, open the input queue, and
close it when the map is over.

A map's inputs wait in the MAPIN work queue under `mapin.<user>.<job>`, which only their owner
may publish to. The gateway makes the durable consumer `map-<job>` over that subject before
the job is submitted (so no input is ever without it), and removes it with any inputs left
once the job has ended, whichever gateway replica sees the end (a repeat finds nothing).
"""

from __future__ import annotations

import contextlib
import logging

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.runner.mapfeed import ACK_WAIT_S, WINDOW
from shared import bus, subjects
from shared import events as ev
from shared.errors import InvalidArgument

log = logging.getLogger(__name__)

MAX_INPUTS = 10_000_000
MAX_RETRIES = 10


def check_map(spec: ev.MapSpec | None, entrypoint: str) -> ev.MapSpec | None:
    """The map part of a submit, checked (INVALID_ARGUMENT naming the field)."""
    if spec is None:
        return None
    if entrypoint != "function":
        raise InvalidArgument("A warm map runs a function, not a script", field="map")
    if not 1 <= spec.warm <= ev.MAX_WARM:
        raise InvalidArgument(
            f"map.warm must be 1-{ev.MAX_WARM} processes, got {spec.warm}", field="map.warm"
        )
    if not 1 <= spec.inputs <= MAX_INPUTS:
        raise InvalidArgument(
            f"map.inputs must be 1-{MAX_INPUTS}, got {spec.inputs}", field="map.inputs"
        )
    if not 0 <= spec.retries <= MAX_RETRIES:
        raise InvalidArgument(
            f"map.retries must be 0-{MAX_RETRIES}, got {spec.retries}", field="map.retries"
        )
    return spec


async def open_queue(js: JetStreamContext, user: str, job_id: str) -> None:
    """The map's input consumer (a repeat of the same submit finds it made)."""
    config = ConsumerConfig(
        durable_name=subjects.map_consumer(job_id),
        filter_subject=subjects.map_input(user, job_id),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
        max_ack_pending=WINDOW,
    )
    js = bus.cluster_js(js)
    await bus.until_ready(lambda: js.add_consumer(subjects.MAPIN_STREAM, config=config))


async def close_queue(js: JetStreamContext, user: str, job_id: str) -> None:
    """Remove the map's consumer and whatever inputs it left (it ended: none will be read)."""
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(subjects.MAPIN_STREAM, subjects.map_consumer(job_id))
    await js.purge_stream(subjects.MAPIN_STREAM, subject=subjects.map_input(user, job_id))


async def open_queues(js: JetStreamContext) -> dict[str, str]:
    """Every map queue there is now: job id -> user (found again after a restart)."""
    out: dict[str, str] = {}
    try:
        infos = await js.consumers_info(subjects.MAPIN_STREAM)
    except nats.js.errors.NotFoundError:
        return out
    for info in infos:
        name = info.name or ""
        subject = (info.config.filter_subject or "") if info.config else ""
        parts = subject.split(".")
        if name.startswith("map-") and len(parts) == 3:
            out[name[len("map-") :]] = parts[1]
    return out
