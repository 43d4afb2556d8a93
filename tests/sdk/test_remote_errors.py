"""A job's exception keeps its type in the caller, with the user's own traceback; `sys.exit(n)`
in a job is an exit status, not a traceback; an error that retrying cannot change is raised at
once. Through the real stack: the process backend, and the Docker engine (marked `docker`)."""

from __future__ import annotations

import inspect
import sys
import time

import pytest

from cumulus import AsyncClient, Internal, JobOptions, ResourceExhausted
from services.stack import Stack
from shared.errors import CumulusError

HERE = __file__


class DivergedError(Exception):
    """The user's own exception class, defined in a module the caller has imported."""


def raise_value_error(lr: float) -> None:
    if lr > 1:
        raise ValueError(f"learning rate {lr} is too high")  # RAISE-LINE


def raise_diverged() -> None:
    raise DivergedError("loss is nan")


def raise_local_class() -> None:
    class Unknowable(Exception):
        pass

    raise Unknowable("a class the caller cannot name")


def exit_3() -> None:
    print("giving up", flush=True)
    sys.exit(3)


RAISE_LINE = next(
    n
    for n, line in enumerate(inspect.getsource(sys.modules[__name__]).splitlines(), 1)
    if line.endswith("# RAISE-LINE")
)


async def _check_value_error(client: AsyncClient) -> None:
    with pytest.raises(ValueError, match="learning rate 3 is too high") as info:
        await client.run_call(raise_value_error, (3,), None, JobOptions(gpu=0.1, duration=600))
    err = info.value
    assert isinstance(err, Internal)
    assert isinstance(err, CumulusError)
    assert err.code == "INTERNAL"
    assert err.job_id
    trace = err.remote_traceback
    # The user's file and line, as they wrote them; none of the in-job runner's frames.
    assert f'File "{HERE}", line {RAISE_LINE}, in raise_value_error' in trace, trace
    assert "job_image" not in trace, trace
    assert "runpy" not in trace, trace
    assert trace.rstrip().endswith("ValueError: learning rate 3 is too high")
    with pytest.raises(ValueError, match="learning rate 4") as second:
        await client.run_call(raise_value_error, (4,), None, JobOptions(gpu=0.1, duration=600))
    assert type(second.value) is type(err)  # one class per remote type


async def test_a_remote_value_error_is_a_value_error_here(client: AsyncClient) -> None:
    await _check_value_error(client)


async def test_the_users_own_exception_class_is_kept(client: AsyncClient) -> None:
    with pytest.raises(DivergedError, match="loss is nan") as info:
        await client.run_call(raise_diverged, (), None, JobOptions(gpu=0.1, duration=600))
    assert isinstance(info.value, Internal)


async def test_a_class_the_caller_cannot_name_falls_back_to_internal(
    client: AsyncClient,
) -> None:
    with pytest.raises(Internal, match="a class the caller cannot name") as info:
        await client.run_call(raise_local_class, (), None, JobOptions(gpu=0.1, duration=600))
    assert type(info.value) is Internal
    assert "in raise_local_class" in info.value.remote_traceback


async def test_sys_exit_in_a_job_is_an_exit_status_not_a_traceback(client: AsyncClient) -> None:
    with pytest.raises(Internal) as info:
        await client.run_call(exit_3, (), None, JobOptions(gpu=0.1, duration=600), logs=False)
    err = info.value
    assert not isinstance(err, SystemExit)
    assert err.message == "the job exited with exit status 3"
    assert err.remote_traceback == ""


async def test_a_job_larger_than_the_pool_is_refused_at_once_not_retried(
    client: AsyncClient,
) -> None:
    """Bug 7: three attempts 1 s and 2 s apart for a job that can never fit (2 devices)."""
    started = time.monotonic()
    with pytest.raises(ResourceExhausted) as info:
        await client.submit_call(raise_diverged, (), None, JobOptions(gpu=8, duration=600))
    took = time.monotonic() - started
    err = info.value
    assert err.message == "No workers with sufficient GPU capacity (requested: 8, max available: 2)"
    assert err.permanent
    assert took < 1.0, f"retried for {took:.1f} s"


@pytest.mark.docker
async def test_a_remote_value_error_on_the_docker_backend(make_stack) -> None:  # type: ignore[no-untyped-def]
    from tests.security.test_docker_backend import docker_needed

    docker_needed()
    stack: Stack = await make_stack(workers=["docker-1"], devices="1x16GiB", backend="docker")
    async with AsyncClient(profile=stack.profile()) as client:
        await _check_value_error(client)
        with pytest.raises(Internal) as info:
            await client.run_call(exit_3, (), None, JobOptions(gpu=0.1, duration=600), logs=False)
        assert info.value.message == "the job exited with exit status 3"
