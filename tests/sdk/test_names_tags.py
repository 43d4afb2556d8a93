"""Names, tags and id prefixes, as a user meets them through the SDK against the real stack:
a job is found again by its name, its tags, its age or a unique prefix of its id; bad names
and tags are refused with INVALID_ARGUMENT naming the field; only an observer or an operator
lists other users' jobs."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from cumulus import AsyncClient, InvalidArgument, JobOptions, NotFound
from services.stack import Stack
from shared.errors import PermissionDenied


def square(x: int) -> int:
    return x * x


@pytest.fixture
async def other(stack: Stack) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(profile=stack.profile("alice")) as c:
        yield c


@pytest.fixture
async def observer(stack: Stack) -> AsyncIterator[AsyncClient]:
    path = stack.credentials("observer", "watcher")
    stack.reload()
    async with AsyncClient(profile=path) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_name_tags_and_target_are_kept_and_filter_the_job_list(
    client: AsyncClient,
) -> None:
    name = unique("train")
    tagged = await client.submit_call(
        square, (3,), gpu=0.1, duration=60, name=name, tags={"team": "ml", "run": "7"}
    )
    plain = await client.submit_call(square, (4,), gpu=0.1, duration=60, name=unique("eval"))
    info = await tagged.status()
    assert (info.name, info.tags) == (name, {"team": "ml", "run": "7"})
    assert info.target == f"{__name__}:square"

    by_name = await client.jobs(name=name)
    assert [j.job_id for j in by_name] == [tagged.job_id]
    pattern = name.split("-")[0] + "-*"
    assert tagged.job_id in {j.job_id for j in await client.jobs(name=pattern)}
    assert plain.job_id not in {j.job_id for j in await client.jobs(name=pattern)}

    both = await client.jobs(name=name, tags={"team": "ml", "run": "7"})
    assert [j.job_id for j in both] == [tagged.job_id]
    assert [j.job_id for j in await client.jobs(name=name, tags={"team": None})] == [tagged.job_id]
    assert await client.jobs(name=name, tags={"team": "web"}) == []
    assert await client.jobs(name=name, tags={"absent": None}) == []

    await asyncio.sleep(4.0)
    fresh = await client.submit_call(square, (5,), gpu=0.1, duration=60, name=name)
    recent = await client.jobs(name=name, since=2.5)
    assert [j.job_id for j in recent] == [fresh.job_id]
    assert {j.job_id for j in await client.jobs(name=name, since="1h")} == {
        tagged.job_id,
        fresh.job_id,
    }
    for job in (tagged, plain, fresh):
        await job.wait(timeout=60)
        await job.status()  # read-your-writes: the gateway has applied the job's end
    done = await client.jobs(["COMPLETED"], name=name)
    assert {j.job_id for j in done} == {tagged.job_id, fresh.job_id}


async def test_bad_names_and_tags_are_refused_by_the_sdk_and_the_gateway(
    client: AsyncClient,
) -> None:
    for bad in ({"name": "has space"}, {"name": "x" * 65}, {"name": "-lead"}):
        with pytest.raises(InvalidArgument, match="name"):
            JobOptions(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="at most 16 tags"):
        JobOptions(tags={f"k{i}": "v" for i in range(17)})
    with pytest.raises(InvalidArgument, match="tag key"):
        JobOptions(tags={"bad key": "v"})
    with pytest.raises(InvalidArgument, match="tag team"):
        JobOptions(tags={"team": "line\nbreak"})
    with pytest.raises(InvalidArgument, match="Invalid age"):
        await client.jobs(since="yesterday")

    # What another client might send: the gateway checks it all the same.
    body = {"code_ref": "a" * 64, "gpu": 0.1, "duration": 60}
    with pytest.raises(InvalidArgument, match="Invalid job name") as name_error:
        await client.request("submit", {**body, "name": "no/slash"})
    assert name_error.value.field == "name"
    with pytest.raises(InvalidArgument, match="at most 16 tags") as tags_error:
        await client.request("submit", {**body, "tags": {f"k{i}": "v" for i in range(17)}})
    assert tags_error.value.field == "tags"


async def test_a_unique_id_prefix_stands_for_the_job(
    client: AsyncClient, other: AsyncClient
) -> None:
    first = await client.submit_call(square, (6,), gpu=0.1, duration=60)
    second = await client.submit_call(square, (7,), gpu=0.1, duration=60)
    theirs = await other.submit_call(square, (8,), gpu=0.1, duration=60)
    await first.wait(timeout=60)

    prefix = first.job_id[:10]
    handle = client.get_job(prefix)
    info = await handle.status()
    assert info.job_id == first.job_id
    assert handle.job_id == first.job_id  # the handle keeps the whole id from here on
    lines = [line async for line in client.get_job(prefix).logs()]
    assert lines == []  # square prints nothing; the watch found the job by its prefix
    assert (await client.get_job(prefix).cancel()).job_id == first.job_id

    with pytest.raises(InvalidArgument, match=r"ambiguous: \d+ jobs start with 'j'"):
        await client.get_job("j").status()
    with pytest.raises(NotFound):
        await client.get_job("jzzzz").status()
    with pytest.raises(NotFound):  # another user's job is not found by its prefix either
        await client.get_job(theirs.job_id[:10]).status()
    for job in (second,):
        await job.wait(timeout=60)
    await theirs.wait(timeout=60)


async def test_only_observers_and_operators_list_other_users_jobs(
    client: AsyncClient, other: AsyncClient, observer: AsyncClient
) -> None:
    name = unique("shared")
    mine = await client.submit_call(square, (2,), gpu=0.1, duration=60, name=name)
    theirs = await other.submit_call(square, (3,), gpu=0.1, duration=60, name=name)

    assert [j.job_id for j in await client.jobs(name=name)] == [mine.job_id]
    with pytest.raises(PermissionDenied, match="only an observer or an operator"):
        await client.jobs(user="alice")
    with pytest.raises(PermissionDenied):
        await client.jobs(all_users=True)

    everyone = await observer.jobs(name=name, all_users=True)
    assert {(j.job_id, j.user) for j in everyone} == {
        (mine.job_id, client.user),
        (theirs.job_id, "alice"),
    }
    assert [j.job_id for j in await observer.jobs(name=name, user="alice")] == [theirs.job_id]
    await mine.wait(timeout=60)
    await theirs.wait(timeout=60)
