"""The gateway's snapshot: its job table at a log position, so replay starts there.

The runtime (shared/service.py) takes one every `retention.snapshot_events` logged events,
right after `compact` dropped the jobs that ended more than `retention.forget_after_s` ago,
and drops the log rows before it. Only the jobs are stored: the per-user waiting counts follow
from them (`JobTable(jobs)`). JSON, as the events are: a job's result is raw JSON already.
"""

from __future__ import annotations

import msgspec

from services.gateway.state import JobTable
from shared.errors import EventLogError
from shared.views import JobInfo


class GatewaySnapshot(
    msgspec.Struct, kw_only=True, tag_field="type", tag="cumulus.gateway.snapshot.v1"
):
    """The job table. The tag is the format's version: a later v1 may add fields (with
    defaults), which this one ignores; a change a v1 reader would misread is a v2."""

    jobs: list[JobInfo] = []
    """Every job in memory, in the table's order."""
    epoch: int = 0
    """The largest scheduler epoch seen (the fence)."""


_decoder = msgspec.json.Decoder(GatewaySnapshot)


def encode(table: JobTable) -> bytes:
    return msgspec.json.encode(GatewaySnapshot(jobs=list(table.jobs.values()), epoch=table.epoch))


def decode(data: bytes) -> JobTable:
    """The table a snapshot holds; EventLogError if it is not one this gateway reads."""
    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventLogError(
            f"The gateway's snapshot cannot be read ({exc}): it was written by another "
            "version of Cumulus or is damaged; run the version that wrote it"
        ) from None
    return JobTable(snap.jobs, snap.epoch)


def compact(table: JobTable, now: float, forget_after_s: float) -> list[str]:
    """Drop the jobs that ended more than `forget_after_s` before `now`; their ids."""
    return table.forget(now - forget_after_s)
