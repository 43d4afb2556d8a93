"""The subject layout is a public API: permissions and worker filters depend on token positions."""

from __future__ import annotations

import pytest

from shared import subjects


def test_job_subject_layout() -> None:
    assert subjects.job("alice", "j1", "w1", "started") == "jobs.alice.j1.w1.started"


def test_job_without_worker_uses_underscore() -> None:
    assert subjects.job("alice", "j1", "", "submitted") == "jobs.alice.j1._.submitted"


@pytest.mark.parametrize(
    ("user", "job_id", "worker_id", "event"),
    [
        ("alice", "j1", "w1", "started"),
        ("bob", "0f3a-9c", "", "submitted"),
        ("u_1", "J-2", "gpu-01", "partition_ready"),
    ],
)
def test_parse_job_subject_round_trips(user: str, job_id: str, worker_id: str, event: str) -> None:
    subject = subjects.job(user, job_id, worker_id, event)
    assert subjects.parse_job_subject(subject) == (user, job_id, worker_id, event)


def test_user_is_second_token_and_worker_fourth() -> None:
    tokens = subjects.job("alice", "j1", "w7", "scheduled").split(".")
    assert tokens[1] == "alice"
    assert tokens[3] == "w7"


def test_worker_filters_select_by_the_worker_token() -> None:
    assert subjects.job_events("scheduled", "cancel", worker_id="w7") == [
        "jobs.*.*.w7.scheduled",
        "jobs.*.*.w7.cancel",
    ]
    assert subjects.terminal_events() == [
        "jobs.*.*.*.completed",
        "jobs.*.*.*.failed",
        "jobs.*.*.*.timed_out",
        "jobs.*.*.*.cancelled",
    ]


def test_every_event_of_one_job() -> None:
    assert subjects.job_all("j1") == "jobs.*.j1.>"
    assert subjects.job_all("j1", user="alice") == "jobs.alice.j1.>"


def test_other_subjects() -> None:
    assert subjects.worker("w1", "heartbeat") == "workers.w1.heartbeat"
    assert subjects.api("submit", "alice") == "cumulus.api.alice.submit"
    assert subjects.api("submit") == "cumulus.api.default.submit"
    assert subjects.api_user("cumulus.api.alice.submit") == "alice"
    assert subjects.dead("scheduler") == "cumulus.dead.scheduler"


@pytest.mark.parametrize("token", ["alice", "a", "job-1_X", "0" * 64, "_x", "a_"])
def test_valid_token_accepts(token: str) -> None:
    assert subjects.valid_token(token)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("a.b", id="dot"),
        pytest.param("a b", id="space"),
        pytest.param("a*", id="star"),
        pytest.param("*", id="star-alone"),
        pytest.param(">", id="gt"),
        pytest.param("a>", id="gt-suffix"),
        pytest.param("", id="empty"),
        pytest.param("_", id="no-worker-marker"),
        pytest.param("x" * 65, id="too-long"),
        pytest.param("a\tb", id="tab"),
        pytest.param("ä", id="non-ascii"),
    ],
)
def test_valid_token_rejects(token: str) -> None:
    assert not subjects.valid_token(token)


@pytest.mark.parametrize("token", ["alice\n", "j1\n"])
def test_valid_token_rejects_trailing_newline(token: str) -> None:
    assert not subjects.valid_token(token)


def test_output_and_result_parts_have_streams_of_their_own() -> None:
    assert subjects.log("alice", "j1", "w1") == "logs.alice.j1.w1"
    assert subjects.job_logs("j1", user="alice") == "logs.alice.j1.>"
    assert subjects.result("alice", "j1", "w1", 2) == "results.alice.j1.w1.2"
    assert subjects.stream_of("jobs.alice.j1.w1.started") == subjects.JOBS_STREAM
    assert subjects.stream_of("logs.alice.>") == subjects.LOGS_STREAM
    assert subjects.stream_of("results.*.j1.w1.1") == subjects.RESULTS_STREAM
    assert subjects.stream_of("workers.w1.heartbeat") == ""


def test_parse_job_subject_reads_every_layout_of_a_job() -> None:
    assert subjects.parse_job_subject("logs.alice.j1.w1") == ("alice", "j1", "w1", "log")
    assert subjects.parse_job_subject("results.alice.j1.w1.3") == ("alice", "j1", "w1", "result")


@pytest.mark.parametrize(
    "subject",
    [
        "jobs.alice.j1.w1.log",  # output is not job history
        "jobs.alice.j1.w1.result",
        "logs.alice.j1.w1.log",
        "results.alice.j1.w1",
        "workers.w1.heartbeat",
        "jobs.alice.j1.w1",
    ],
)
def test_parse_job_subject_refuses_anything_else(subject: str) -> None:
    with pytest.raises(ValueError, match="not a job subject"):
        subjects.parse_job_subject(subject)


def test_a_worker_publishes_output_and_result_parts_under_its_own_token() -> None:
    from shared import auth

    assert auth.worker_subject("w1", "log") == "logs.*.*.w1"
    assert auth.worker_subject("w1", "result") == "results.*.*.w1.*"
    assert auth.worker_subject("w1", "started") == "jobs.*.*.w1.started"
    creds = auth.Credentials(name="w1", role="worker", workers=["w1"])
    allowed = auth.permissions(creds)["publish"]["allow"]
    assert "logs.*.*.w1" in allowed
    assert "results.*.*.w1.*" in allowed
    assert not any(s.startswith("jobs.") and s.endswith((".log", ".result")) for s in allowed)
