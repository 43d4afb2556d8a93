"""chronos_cli end to end: upstream-shaped output, one-object JSON, one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cumulus_core.cli import main

from .conftest import CLI, cli_env

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """`main` in this process against a fresh state dir: (exit code, stdout, stderr)."""
    monkeypatch.setenv("CHRONOS_DEVICES", "virtual")
    monkeypatch.setenv("CHRONOS_VIRTUAL_DEVICES", "2x16GiB")
    monkeypatch.setenv("CHRONOS_STATE_DIR", str(tmp_path / "state"))

    def invoke(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def test_create_prints_the_upstream_line(run: Run) -> None:
    code, out, err = run("create", "0", "0.5", "3600", "--label", "job-1")
    assert (code, err) == (0, "")
    first, second = out.splitlines()
    assert first == (
        "Created partition partition_0001 on device 0 (Virtual GPU 16GiB) "
        "with 8192 MB for 3600 seconds"
    )
    assert re.fullmatch(
        r"Amount: 0\.5 GPU \(virtual device\), expires at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, "
        r"label: job-1",
        second,
    )


def test_release_list_stats_available_reap(run: Run) -> None:
    assert run("list") == (0, "No active partitions\n", "")
    run("create", "1", "0.3", "600")
    code, out, _ = run("list")
    assert out.splitlines()[:5] == [
        "Active partitions:",
        "-----------------",
        "ID: partition_0001",
        "  Device: 1 (Virtual GPU 16GiB, virtual)",
        "  Memory: 30%",
    ]
    assert "  Amount: 0.3 GPU" in out
    assert re.search(r"  Time remaining: (599|600) seconds", out)
    assert run("available", "1") == (0, "70.00\n", "")
    assert run("available", "0") == (0, "100.00\n", "")
    code, out, _ = run("stats")
    assert out.startswith("Device statistics:\n=================\nDevice 0: Virtual GPU 16GiB\n")
    assert "  Type: GPU (virtual)\n" in out
    assert "    Usage: 30.00%\n" in out
    assert "    Partitions: partition_0001\n" in out
    assert run("release", "partition_0001") == (0, "Partition partition_0001 released\n", "")
    assert run("reap") == (0, "No expired partitions\n", "")


def test_json_output_is_one_object_per_command(run: Run) -> None:
    code, out, _ = run("--json", "create", "0", "0.5", "60")
    created = json.loads(out)
    assert created["partition_id"] == "partition_0001"
    assert (created["tenths"], created["amount"], created["device"]) == (5, "0.5", 0)
    assert created["env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    # options may also follow the command
    listed = json.loads(run("list", "--json")[1])
    assert listed == {"partitions": [created]}
    assert json.loads(run("available", "0", "--json")[1]) == {
        "device": 0,
        "free": "0.5",
        "free_tenths": 5,
    }
    stats = json.loads(run("--json", "stats")[1])
    assert stats["devices"][0] == {
        "index": 0,
        "name": "Virtual GPU 16GiB",
        "kind": "virtual",
        "uuid": stats["devices"][0]["uuid"],
        "memory_bytes": 16 * 1024**3,
        "allocated_tenths": 5,
        "free_tenths": 5,
        "partitions": ["partition_0001"],
    }
    assert json.loads(run("--json", "release", "partition_0001")[1]) == created
    assert json.loads(run("--json", "reap")[1]) == {"reaped": []}


def test_devices_option_declares_virtual_devices(run: Run) -> None:
    code, out, _ = run("--devices", "1x80GiB", "--json", "stats")
    assert [d["memory_bytes"] for d in json.loads(out)["devices"]] == [80 * 1024**3]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["create", "2", "0.5", "60"], 2, "Invalid device index: 2. This machine has devices 0-1"),
        (["create", "-1", "0.5", "60"], 2, "Invalid device index: -1"),
        (["create", "zero", "0.5", "60"], 2, "Invalid device index: zero"),
        (
            ["create", "0", "0", "60"],
            2,
            "Invalid GPU amount: 0. Must be 0.1-0.9 or whole number 1-8",
        ),
        (
            ["create", "0", "1.5", "60"],
            2,
            "Invalid GPU amount: 1.5. Must be 0.1-0.9 or whole number 1-8",
        ),
        (["create", "0", "0.1482", "60"], 2, "Invalid GPU amount: 0.1482."),
        (["create", "0", "2", "60"], 2, "A partition lives on one device: amount 2 exceeds 1 GPU"),
        (["create", "0", "0.5", "0"], 2, "Invalid duration: 0."),
        (["create", "0", "0.5", "1.5"], 2, "Invalid duration: 1.5."),
        (["create", "0", "0.5"], 2, "the following arguments are required: duration"),
        (
            ["release", "partition_0042"],
            1,
            "Partition not found or already released: partition_0042",
        ),
        (["available", "9"], 2, "Invalid device index: 9"),
        (["launch"], 2, "invalid choice: 'launch'"),
        ([], 2, "the following arguments are required: COMMAND"),
        (["--backend", "tpu", "stats"], 2, "invalid choice: 'tpu'"),
        (["--devices", "2xlots", "stats"], 2, "Invalid device spec '2xlots'"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(
    run: Run, argv: list[str], code: int, message: str
) -> None:
    got, out, err = run(*argv)
    assert got == code
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("chronos_cli: error: ")
    assert message in err
    assert "Traceback" not in err


def _error_object(err: str) -> dict[str, object]:
    """What --json prints for the failure whose stderr line is `err`, less its details."""
    return {"code": None, "message": err.removeprefix("chronos_cli: error: ").rstrip("\n")}


@pytest.mark.parametrize(
    ("argv", "exit_code", "code", "details"),
    [
        (
            ["release", "partition_0042"],
            1,
            "NOT_FOUND",
            {"partition_id": "partition_0042"},
        ),
        (["create", "2", "0.5", "60"], 2, "INVALID_ARGUMENT", {"device": 2, "device_count": 2}),
        (["create", "0", "0.25", "60"], 2, "INVALID_ARGUMENT", {"amount": "0.25"}),
        (["create", "0", "0.5", "1.5"], 2, "INVALID_ARGUMENT", {"duration_s": "1.5"}),
        (["launch"], 2, "INVALID_ARGUMENT", {}),
        (["--devices", "2xlots", "stats"], 2, "INVALID_ARGUMENT", {"spec": "2xlots"}),
    ],
)
def test_json_errors_are_one_object_on_stdout_beside_the_stderr_line(
    run: Run, argv: list[str], exit_code: int, code: str, details: dict[str, object]
) -> None:
    for placed in (["--json", *argv], [*argv, "--json"]):
        got, out, err = run(*placed)
        assert got == exit_code
        assert out.count("\n") == 1
        assert err.count("\n") == 1
        assert err.startswith("chronos_cli: error: ")
        assert json.loads(out) == {
            "error": {**_error_object(err), "code": code, "details": details}
        }


def test_json_capacity_and_corrupt_state_errors_carry_their_numbers(
    run: Run, tmp_path: Path
) -> None:
    run("create", "0", "0.8", "60")
    code, out, err = run("--json", "create", "0", "0.3", "60")
    assert code == 1
    assert json.loads(out)["error"] == {
        **_error_object(err),
        "code": "RESOURCE_EXHAUSTED",
        "details": {"device": 0, "requested_tenths": 3, "free_tenths": 2},
    }
    (tmp_path / "state" / "partitions.json").write_text("[")
    code, out, err = run("--json", "list")
    error = json.loads(out)["error"]
    assert (code, error["code"]) == (1, "UNAVAILABLE")
    assert error["details"]["path"] == str(tmp_path / "state" / "partitions.json")
    assert Path(error["details"]["moved_to"]).read_text() == "["


def test_without_json_an_error_prints_nothing_on_stdout(run: Run) -> None:
    code, out, err = run("release", "partition_0042")
    assert (code, out) == (1, "")
    assert err == "chronos_cli: error: Partition not found or already released: partition_0042\n"


def test_a_real_process_prints_json_errors(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "--json", "release", "partition_0007"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout) == {
        "error": {
            "code": "NOT_FOUND",
            "message": "Partition not found or already released: partition_0007",
            "details": {"partition_id": "partition_0007"},
        }
    }
    assert done.stderr == (
        "chronos_cli: error: Partition not found or already released: partition_0007\n"
    )


def test_capacity_error(run: Run) -> None:
    run("create", "0", "0.8", "60")
    code, out, err = run("create", "0", "0.3", "60")
    assert (code, out) == (1, "")
    assert err == (
        "chronos_cli: error: Not enough available capacity on device 0: requested 0.3 GPU, "
        "free 0.2 GPU. Release a partition, wait for one to expire, or request less\n"
    )


def test_corrupt_state_fails_once_then_recovers(run: Run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "partitions.json").write_text('{"version": 1, "partitions": [')
    code, out, err = run("create", "0", "0.5", "60")
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith("chronos_cli: error: Partition state ")
    moved = re.search(r"moved it to (\S+) and started an empty table", err)
    assert moved is not None
    assert Path(moved.group(1)).read_text() == '{"version": 1, "partitions": ['
    assert run("create", "0", "0.5", "60")[0] == 0


def test_help_exits_zero(run: Run) -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "create" in out


def test_a_real_process_fails_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for argv, code in [(["create", "0", "1.5", "60"], 2), (["release", "partition_0001"], 1)]:
        done = subprocess.run(
            [*CLI, "--state-dir", str(state), *argv],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == code
        assert done.stdout == ""
        assert len(done.stderr.splitlines()) == 1
        assert done.stderr.startswith("chronos_cli: error: ")


def test_a_real_process_reads_amounts_exactly(tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "create", "0", "0.25", "60"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "chronos_cli: error: Invalid GPU amount: 0.25. Must be 0.1-0.9 or whole number 1-8\n"
    )
    done = subprocess.run(
        [*CLI, "--state-dir", str(tmp_path), "create", "0", "0.2", "60"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0
    assert done.stdout.startswith(
        "Created partition partition_0001 on device 0 (Virtual GPU 16GiB)"
    )
