"""The runner's decisions and its line splitter, pure: no NATS, no backend started."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from job_image.runner import FRAME, end_marker
from services.runner import handlers
from services.runner import state as st
from services.runner.app import Runner
from services.runner.lines import MAX_LINE, LineSplitter
from shared import config as config_mod
from shared import events as ev

SPEC = ev.JobSpec(code_ref="c" * 64, gpu_tenths=5, duration_s=60)


def running(job_id: str = "j1", **changes: object) -> st.RunJob:
    job = st.RunJob(
        job_id=job_id,
        user="u",
        spec=SPEC,
        attempt=1,
        env={"CUDA_VISIBLE_DEVICES": "0"},
        partition_ids=["p1"],
        status="running",
        nonce="n" * 32,
        started_at=1000.0,
    )
    for name, value in changes.items():
        setattr(job, name, value)
    return job


def test_work_sorts_jobs_into_cancels_starts_and_watchers() -> None:
    state = st.RunnerState("w1")
    state.jobs = {
        "a": running("a", status="ready", cancel=True),
        "b": running("b", status="ready"),
        "c": running("c", status="launching"),
        "d": running("d"),
        "e": running("e", status="done"),
        "f": running("f"),
    }
    work = handlers.work(state, busy={"f"})
    assert [j.job_id for j in work.cancel] == ["a"]
    assert [j.job_id for j in work.start] == ["b", "c"]
    assert [j.job_id for j in work.watch] == ["d"]


def test_leftovers_are_what_no_running_attempt_owns() -> None:
    state = st.RunnerState("w1")
    state.jobs = {"a": running("a"), "b": running("b", status="done")}
    held = [("a", 1), ("a", 0), ("b", 1), ("ghost", 3)]
    assert handlers.leftovers(state, held) == [("a", 0), ("b", 1), ("ghost", 3)]


def test_a_job_stops_for_revocation_then_cancel_then_its_deadline() -> None:
    assert handlers.stop(running(), now=1059.0) is None
    assert handlers.stop(running(), now=1060.0) is handlers.Stop.TIMEOUT
    assert handlers.stop(running(cancel=True), now=0.0) is handlers.Stop.CANCEL
    assert handlers.stop(running(cancel=True, revoked=True), now=0.0) is handlers.Stop.REVOKED
    timed_out = handlers.ending(running(), "w1", handlers.Stop.TIMEOUT)
    assert isinstance(timed_out, ev.JobTimedOut)
    assert timed_out.message == "Job exceeded allocated duration of 60 seconds"
    assert timed_out.duration_s == 60
    cancelled = handlers.ending(running(cancel=True), "w1", handlers.Stop.CANCEL)
    assert isinstance(cancelled, ev.JobCancelled)
    assert cancelled.message == "cancelled by user"


def test_the_result_frame_is_taken_out_of_the_output() -> None:
    job = running()
    payload = base64.b64encode(json.dumps({"ok": True, "value": 4}).encode()).decode()
    frames = handlers.Frames(job.nonce)
    lines = frames.lines(
        [
            ("stdout", "hello"),
            ("stdout", f"partial{FRAME} {job.nonce} {payload}"),
            ("stdout", end_marker(job.nonce)),
            ("stderr", "warn" + end_marker(job.nonce)),
        ]
    )
    assert lines == [
        ev.LogLine("stdout", "hello"),
        ev.LogLine("stdout", "partial"),
        ev.LogLine("stderr", "warn"),
    ]
    assert frames.result == {"ok": True, "value": 4}
    done = handlers.outcome(job, "w1", frames.result, "exit 0", 1.5)
    assert isinstance(done, ev.JobCompleted)
    assert done.runtime_s == 1.5


def test_an_exit_without_a_result_fails_saying_why() -> None:
    failed = handlers.outcome(running(), "w1", None, "the job's process exited with code 1", 0)
    assert isinstance(failed, ev.JobFailed)
    assert failed.message == "Job ended without a result: the job's process exited with code 1"
    raised = handlers.outcome(
        running(), "w1", {"ok": False, "type": "ValueError", "message": "bad"}, "", 0
    )
    assert isinstance(raised, ev.JobFailed)
    assert raised.message == "ValueError: bad"


def test_log_events_batch_and_truncate_at_the_limit() -> None:
    job = running()
    lines = [ev.LogLine("stdout", "x" * 10) for _ in range(5)]
    records = handlers.log_events(job, "w1", lines, {"stdout": 55}, limit=40)
    assert records is not None
    events, (cursor,) = records
    (log,) = events
    assert isinstance(log, ev.JobLog)
    assert [line.text for line in log.lines][-1] == "[cumulus] output truncated after 36 bytes"
    assert cursor.truncated
    assert cursor.seq == 3
    assert handlers.log_events(job, "w1", [], {}, limit=40) is None


def test_the_job_env_layers_host_partition_spec_and_ours() -> None:
    env = handlers.job_env(running(), "w1", {"PATH": "/bin", "SECRET": "x"}, 100, wheelhouse="/wh")
    assert env["PATH"] == "/bin"
    assert "SECRET" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["CUMULUS_WORKER_ID"] == "w1"
    assert env["CUMULUS_WHEELHOUSE"] == "/wh"


def test_the_splitter_cuts_long_lines_and_keeps_offsets() -> None:
    split = LineSplitter(10)
    split.feed(b"a\r\nbb\n" + b"c" * (MAX_LINE + 1) + b"\ntail")
    got = split.lines(final=False)
    assert [(len(raw), at) for raw, at in got] == [
        (2, 13),
        (2, 16),
        (MAX_LINE, 16 + MAX_LINE),
        (1, 18 + MAX_LINE),
    ]
    assert split.lines(final=True) == [(b"tail", 22 + MAX_LINE)]


def test_a_line_cut_at_max_line_does_not_leave_an_empty_line_behind() -> None:
    split = LineSplitter()
    split.feed(b"x" * MAX_LINE)
    assert [len(raw) for raw, _ in split.lines(final=False)] == [MAX_LINE]
    split.feed(b"\nnext\n")
    assert split.lines(final=False) == [(b"next", MAX_LINE + 6)]


# -- fencing by attempt (issue 11, finding 4) ---------------------------------------------
# Events go through the service's own `step` (what its consumer runs per event); what the
# runner then does is read from `handlers.work`, as `Runner.reconcile` does.


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    config = config_mod.load(
        environ={
            "CUMULUS_DATA_DIR": str(tmp_path),
            "CUMULUS_WORKER_ID": "w1",
            "CUMULUS_WORKER_SANDBOX": "none",  # nothing is started here
        }
    )
    return Runner(config)


def ready(attempt: int, job_id: str = "j1") -> ev.PartitionReady:
    return ev.PartitionReady(
        job_id=job_id,
        worker_id="w1",
        spec=SPEC,
        attempt=attempt,
        partition_ids=[f"p{attempt}"],
        devices=[0],
        env={"CUDA_VISIBLE_DEVICES": "0"},
        expires_at=0.0,
    )


def revoked(attempt: int, job_id: str = "j1") -> ev.PlacementRevoked:
    return ev.PlacementRevoked(job_id=job_id, worker_id="w1", attempt=attempt, reason="lost")


def launching(attempt: int, job_id: str = "j1") -> st.Launching:
    return st.Launching(job_id=job_id, attempt=attempt, nonce="n" * 32)


def started(attempt: int, job_id: str = "j1") -> ev.JobStarted:
    return ev.JobStarted(
        job_id=job_id, worker_id="w1", backend="process", handle="4242", attempt=attempt
    )


def todo(r: Runner, busy: tuple[str, ...] = ()) -> dict[str, list[tuple[str, int]]]:
    work = handlers.work(r.state, busy)
    return {
        kind: [(j.job_id, j.attempt) for j in getattr(work, kind)]
        for kind in ("discard", "cancel", "start", "watch")
        if getattr(work, kind)
    }


def test_a_revoke_before_the_partition_is_remembered_and_the_attempt_never_starts(
    runner: Runner,
) -> None:
    runner.step(revoked(1))  # the partitioner was paused: the revoke comes first
    runner.step(ready(1))  # then the late partition of the revoked attempt
    assert todo(runner) == {}
    assert runner.state.jobs["j1"].status == "done"
    runner.step(ready(2))  # the next attempt, placed here again, runs
    assert todo(runner) == {"start": [("j1", 2)]}


def test_a_ready_of_an_older_attempt_after_a_newer_one_is_ignored(runner: Runner) -> None:
    runner.step(ready(2))
    runner.step(ready(1))
    assert runner.state.jobs["j1"].attempt == 2
    assert todo(runner) == {"start": [("j1", 2)]}


def test_a_revoke_during_start_discards_the_attempt_and_reports_nothing(runner: Runner) -> None:
    runner.step(ready(1))
    runner.step(launching(1))
    runner.step(revoked(1))  # while the backend starts it
    runner.step(started(1))  # its start was reported after the revoke was applied
    job = runner.state.jobs["j1"]
    assert (job.status, job.revoked, job.handle) == ("running", True, "4242")
    assert handlers.stop(job, now=0.0) is handlers.Stop.REVOKED
    assert todo(runner, busy=("j1",)) == {}  # its start task discards it
    assert todo(runner) == {"discard": [("j1", 1)]}  # or, once that is over, reconciling does
    runner.step(st.Discarded(job_id="j1", attempt=1))
    assert todo(runner) == {}
    assert job.status == "done"


def test_a_revoked_attempt_not_yet_launched_is_over_at_once(runner: Runner) -> None:
    runner.step(ready(1))
    runner.step(revoked(1))
    runner.step(launching(1))  # a start task that began before the revoke
    assert runner.state.jobs["j1"].status == "done"
    assert todo(runner) == {}


def test_a_running_attempt_replaced_by_a_newer_one_is_killed_before_it_starts(
    runner: Runner,
) -> None:
    runner.step(ready(1))
    runner.step(launching(1))
    runner.step(started(1))
    runner.step(revoked(1))
    runner.step(ready(2))
    assert todo(runner) == {"discard": [("j1", 1)]}
    runner.step(st.Discarded(job_id="j1", attempt=1))
    assert todo(runner) == {"start": [("j1", 2)]}
    assert runner.state.discarding == {}


def test_a_newer_ready_without_the_revoke_still_fences_the_running_attempt(
    runner: Runner,
) -> None:
    runner.step(ready(1))
    runner.step(launching(1))
    runner.step(started(1))
    runner.step(ready(2))
    old = runner.state.discarding["j1"]
    assert (old.attempt, old.revoked) == (1, True)
    assert todo(runner) == {"discard": [("j1", 1)]}


def test_a_cancel_after_a_revoke_waits_for_the_next_attempt(runner: Runner) -> None:
    runner.step(revoked(1))
    runner.step(ev.CancelOrdered(job_id="j1", worker_id="w1"))
    runner.step(ready(2))
    assert todo(runner) == {"cancel": [("j1", 2)]}


def test_an_end_names_its_attempt() -> None:
    job = running(attempt=3)
    ending = handlers.fenced(handlers.cancelled(job, "w1"), job)
    assert ending.attempt == 3


def test_a_start_the_engine_broke_off_fails_unavailable_naming_the_worker() -> None:
    """A host going down while a job starts on it: its engine's connection aborts mid-call
    (what the fleet test saw: ResponseNotReady under requests' ConnectionError). The job ends
    UNAVAILABLE, as for a lost worker; any other start failure stays INTERNAL."""
    import http.client

    import requests
    import urllib3

    aborted = urllib3.exceptions.ProtocolError(
        "Connection aborted.", http.client.ResponseNotReady()
    )
    lost = handlers.start_failed(running(), "w3", requests.exceptions.ConnectionError(aborted))
    assert lost.code == "UNAVAILABLE"
    assert "w3" in lost.message
    assert handlers.start_failed(running(), "w3", ConnectionRefusedError()).code == "UNAVAILABLE"
    broken = handlers.start_failed(running(), "w3", ValueError("bad image"))
    assert (broken.code, broken.message) == ("INTERNAL", "Failed to start the job on w3: bad image")
