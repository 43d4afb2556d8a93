"""docs/lifecycle.md matches the code, without a bus.

Every event of the catalog (shared/events.py) has a row in the lifecycle table, and the
durable consumers a row names are exactly those whose filters take that event's subject (NATS
wildcard rules), read from each service's `consumers()`. A consumer that receives an event
only to skip it (`ignore`) must say so. Every code link in the page points at a file that
exists and at a name that file defines, so a rename breaks this test rather than the page.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from services.gateway.app import Gateway
from services.partitioner.app import Partitioner
from services.runner.app import Runner
from services.scheduler.app import Scheduler
from shared import events as ev
from shared import subjects
from shared.config import Config, WorkerConfig
from shared.service import EventService

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "lifecycle.md"
WORKER = "w1"
"""The worker every example subject names and every per-worker service serves."""
HEADER = "| Event | Consumed by (durable) |"
EVENT_TYPES: tuple[type[ev.Event], ...] = (*ev.JOB_EVENT_TYPES, *ev.WORKER_EVENT_TYPES)

_NAME = re.compile(r"^`([a-z_]+)`$")
_TICKED = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[`([^`]+)`\]\((\.\./[^)#\s]+)\)")


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    want, got = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or token not in ("*", got[i]):
            return False
    return len(want) == len(got)


def example_subject(event_type: type[ev.Event]) -> str:
    """Where an event of this type is published (shared/bus.py `subject_of`): a job's output
    and result parts in streams of their own, the rest of its history under `jobs.`."""
    if event_type is ev.JobLog:
        return subjects.log("alice", "j1", WORKER)
    if event_type is ev.JobResultPart:
        return subjects.result("alice", "j1", WORKER, 1)
    if event_type is ev.JobOutputsPart:
        return subjects.outputs("alice", "j1", WORKER, 1)
    if issubclass(event_type, ev.JobEvent):
        return subjects.job("alice", "j1", WORKER, event_type.name)
    return subjects.worker(WORKER, event_type.name)


def as_documented(durable: str) -> str:
    """`partitioner-w1` is written `partitioner-<worker>`: one such consumer per worker."""
    if durable.endswith(f"-{WORKER}"):
        return durable.removesuffix(WORKER) + "<worker>"
    return durable


def table(text: str) -> dict[str, list[str]]:
    """Rows of the lifecycle table by event name: the cells after the first."""
    rows: dict[str, list[str]] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith(HEADER):
            inside = True
            continue
        if not inside:
            continue
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-", ":", " "}:
            continue  # the separator row
        found = _NAME.match(cells[0])
        assert found, f"first cell is not an event name in backticks: {cells[0]!r}"
        assert found[1] not in rows, f"two rows for {found[1]}"
        rows[found[1]] = cells[1:]
    return rows


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> list[EventService[Any]]:
    """Each service as a worker `w1` runs it; constructing one opens nothing."""
    config = Config(
        data_dir=str(tmp_path_factory.mktemp("lifecycle")), worker=WorkerConfig(id=WORKER)
    )
    return [Gateway(config), Scheduler(config), Partitioner(config), Runner(config)]


@pytest.fixture(scope="module")
def rows() -> dict[str, list[str]]:
    return table(DOC.read_text())


def test_matches_follows_nats_wildcards() -> None:
    assert matches("jobs.>", "jobs.a.j.w.started")
    assert not matches("jobs.>", "jobs")
    assert matches("jobs.*.*.w1.scheduled", "jobs.a.j.w1.scheduled")
    assert not matches("jobs.*.*.w1.scheduled", "jobs.a.j.w2.scheduled")
    assert not matches("jobs.*.*.*.started", "jobs.a.j.w.started.x")
    assert matches("workers.>", "workers.w1.lost")


def test_every_event_has_one_row(rows: dict[str, list[str]]) -> None:
    assert sorted(rows) == sorted(t.name for t in EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.name)
def test_row_names_the_consumers_whose_filters_take_it(
    event_type: type[ev.Event], rows: dict[str, list[str]], services: list[EventService[Any]]
) -> None:
    subject = example_subject(event_type)
    expected: set[str] = set()
    skipped = False
    for service in services:
        for spec in service.consumers():
            if any(matches(f, subject) for f in spec.filters):
                expected.add(as_documented(spec.durable))
                skipped = skipped or service.ignore(subject)
    cell = rows[event_type.name][0]
    named = set(_TICKED.findall(cell))
    assert named == expected, f"{subject}: the page names {named}, the filters give {expected}"
    assert ("skipped" in cell) == skipped, f"{subject}: say whether a consumer skips it"


def _defined(name: str, source: str) -> bool:
    return bool(
        re.search(rf"^\s*(?:async def|def|class) {re.escape(name)}\b", source, re.M)
    ) or bool(re.search(rf"^{re.escape(name)}\s*[:=]", source, re.M))


def test_code_links_point_at_what_exists() -> None:
    links = _LINK.findall(DOC.read_text())
    assert links, "the page links no code"
    for label, target in links:
        path = (DOC.parent / target).resolve()
        assert path.is_file(), f"{target} (for {label}) does not exist"
        if path.suffix != ".py":
            continue
        source = path.read_text()
        parts = re.sub(r"\(.*\)$", "", label).split(".")
        if parts[-1] == "py" or "/" in label:
            continue  # a link that names the file itself
        assert _defined(parts[-1], source), f"{target} defines no {parts[-1]} (for {label})"
        if len(parts) > 1 and parts[0][:1].isupper():
            assert _defined(parts[0], source), f"{target} defines no {parts[0]} (for {label})"
