"""chronos_cli's failures come back through the `Chronos` driver as typed shared errors.

Run against our real chronos_cli, in this process and as a subprocess, and against the same
CLI behind a wrapper that drops its JSON error (what an older chronos_cli prints), which the
driver types by exit code alone.
"""

from __future__ import annotations

import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from services.partitioner.chronos import (
    IN_PROCESS,
    Chronos,
    ChronosUnreachable,
    run_in_process,
    run_local,
)
from shared.errors import (
    CumulusError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

OPTIONS = ["--backend", "virtual", "--devices", "1x16GiB"]


def in_process(state: Path) -> Chronos:
    return Chronos(
        command=[IN_PROCESS],
        options=[*OPTIONS, "--state-dir", str(state)],
        run=run_in_process,
        worker_id="w1",
    )


def subprocess_cli(state: Path) -> Chronos:
    return Chronos(
        command=[sys.executable, "-m", "cumulus_core"],
        options=[*OPTIONS, "--state-dir", str(state)],
        worker_id="w1",
    )


def older_cli(state: Path, tmp_path: Path) -> Chronos:
    """Our chronos_cli with its stdout dropped on failure: errors only as a stderr line."""
    script = tmp_path / "old_chronos_cli"
    script.write_text(
        "#!/bin/sh\n"
        f'out=$("{sys.executable}" -m cumulus_core "$@")\n'
        "code=$?\n"
        '[ "$code" -eq 0 ] && printf "%s\\n" "$out"\n'
        'exit "$code"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Chronos(
        command=[str(script)], options=[*OPTIONS, "--state-dir", str(state)], worker_id="w1"
    )


@pytest.fixture(params=["in_process", "subprocess"])
def chronos(request: pytest.FixtureRequest, tmp_path: Path) -> Chronos:
    make = in_process if request.param == "in_process" else subprocess_cli
    return make(tmp_path / "state")


async def test_release_of_an_unknown_partition_is_not_found(chronos: Chronos) -> None:
    with pytest.raises(NotFound) as info:
        await chronos.release("partition_0042")
    assert info.value.resource_id == "partition_0042"
    assert info.value.message == "Partition not found or already released: partition_0042"


async def test_no_room_is_resource_exhausted_with_amounts(chronos: Chronos) -> None:
    await chronos.create(0, 8, 60, "a.1")
    with pytest.raises(ResourceExhausted) as info:
        await chronos.create(0, 3, 60, "b.1")
    assert (info.value.requested, info.value.largest_free) == ("0.3", "0.2")
    assert info.value.message.startswith("Not enough available capacity on device 0:")


async def test_bad_input_is_invalid_argument(chronos: Chronos) -> None:
    with pytest.raises(InvalidArgument) as info:
        await chronos.create(3, 5, 60, "a.1")
    assert info.value.message == "Invalid device index: 3. This machine has devices 0-0"
    with pytest.raises(InvalidArgument):
        await chronos.create(0, 15, 60, "a.1")


async def test_a_corrupt_state_is_unavailable_naming_the_worker_then_works(
    chronos: Chronos, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "partitions.json").write_text('{"version": 1, "partitions": [')
    with pytest.raises(Unavailable) as info:
        await chronos.stats()
    assert info.value.worker_id == "w1"
    assert not isinstance(info.value, ChronosUnreachable)
    assert len(await chronos.stats()) == 1


async def test_a_binary_that_cannot_start_is_unreachable(tmp_path: Path) -> None:
    missing = Chronos(command=[str(tmp_path / "no_such_cli")], worker_id="w7")
    with pytest.raises(ChronosUnreachable) as info:
        await missing.stats()
    assert info.value.worker_id == "w7"
    assert info.value.code == "UNAVAILABLE"


async def test_a_timeout_is_unavailable_not_unreachable(tmp_path: Path) -> None:
    slow = Chronos(command=["sh", "-c", "sleep 5", "sh"], timeout=0.2, worker_id="w2")
    with pytest.raises(Unavailable) as info:
        await slow.stats()
    assert not isinstance(info.value, ChronosUnreachable)
    assert info.value.worker_id == "w2"
    assert "timed out" in info.value.message


async def test_output_that_is_not_json_is_internal(tmp_path: Path) -> None:
    chatty = Chronos(command=["echo", "hello"])
    with pytest.raises(Internal, match="not JSON"):
        await chatty.stats()


async def test_an_older_cli_is_typed_by_exit_code(tmp_path: Path) -> None:
    old = older_cli(tmp_path / "state", tmp_path)
    with pytest.raises(InvalidArgument) as bad:  # exit 2
        await old.create(0, 15, 60, "a.1")
    assert bad.value.message.startswith("Invalid GPU amount: 1.5.")
    made = await old.create(0, 8, 60, "a.1")
    with pytest.raises(Internal) as full:  # exit 1: no code on the wire, no guess from words
        await old.create(0, 3, 60, "b.1")
    assert full.value.message.startswith("Not enough available capacity")
    # A failed release is NotFound when the partition is not in the table: a fact, not words.
    with pytest.raises(NotFound) as gone:
        await old.release("partition_0042")
    assert gone.value.resource_id == "partition_0042"
    await old.release(made.partition_id)
    with pytest.raises(NotFound):
        await old.release(made.partition_id)


async def test_a_failed_release_of_a_held_partition_stays_internal(tmp_path: Path) -> None:
    """Exit 1 while the partition is still listed: not NotFound (the caller retries)."""
    state = tmp_path / "state"
    made = await in_process(state).create(0, 5, 60, "a.1")
    real = run_local

    async def refuses_release(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        if "release" in argv:
            return 1, "", "chronos_cli: error: disk on fire\n"
        return await real(argv, timeout)

    chronos = subprocess_cli(state)
    chronos.run = refuses_release
    with pytest.raises(Internal) as info:
        await chronos.release(made.partition_id)
    assert not isinstance(info.value, NotFound)
    assert info.value.message == "disk on fire"


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [
        (2, InvalidArgument),
        (126, Unavailable),
        (127, Unavailable),
        (-9, Unavailable),
        (3, Internal),
    ],
)
async def test_every_untyped_exit_is_a_cumulus_error(
    exit_code: int, expected: type[CumulusError]
) -> None:
    async def fails(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
        return exit_code, "", "chronos_cli: error: some words\n"

    with pytest.raises(CumulusError) as info:
        await Chronos(run=fails, worker_id="w3").stats()
    assert type(info.value) is expected
    assert info.value.message == "some words"
    if isinstance(info.value, Unavailable):
        assert info.value.worker_id == "w3"
