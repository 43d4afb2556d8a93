"""Volumes per job on the container backends, from the operator's allow-list
(`container.volumes`, shared/volumes.py): a job mounts an offered folder by name where it
asks, read-only where the operator said so; a name not offered, a host path, or a path over
the job's own folders is refused; the process backend refuses volumes rather than ignoring
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from cumulus import AsyncClient, InvalidArgument, JobOptions
from shared import volumes
from shared.errors import ConfigError
from tests.conftest import StackFactory


def test_the_allow_list_and_requests_are_checked() -> None:
    setting = "data=/srv/data:ro, scratch=/srv/scratch"
    offers = volumes.offered(setting)
    assert offers == {
        "data": volumes.Offered("/srv/data", True),
        "scratch": volumes.Offered("/srv/scratch", False),
    }
    assert volumes.offered({"data": "/srv/data"}) == {"data": volumes.Offered("/srv/data", False)}
    with pytest.raises(ConfigError, match="container.volumes"):
        volumes.offered("data:/srv/data")
    with pytest.raises(ConfigError, match="absolute host path"):
        volumes.offered({"data": "relative/dir"})
    assert volumes.mounts(setting, {"data": "/data/"}) == [("/srv/data", "/data", True)]
    with pytest.raises(InvalidArgument, match=r"not offered on this worker .*data, scratch"):
        volumes.mounts(setting, {"nope": "/nope"})
    for bad in ("data", "/", "/job/x", "/tmp", "/data/../job"):
        with pytest.raises(InvalidArgument, match="(?i)volume"):
            volumes.check_request({"data": bad})
    with pytest.raises(InvalidArgument, match="Two volumes at /d"):
        volumes.check_request({"a": "/d", "b": "/d/"})
    with pytest.raises(InvalidArgument, match="mount path"):
        JobOptions(volumes={"data": "data"})  # refused before anything is uploaded


def read_volume() -> str:
    with open("/data/hello.txt") as f:
        return f.read()


def write_volumes() -> dict[str, str]:
    out = {}
    with open("/scratch/out.txt", "w") as f:
        f.write("written by the job")
    try:
        with open("/data/new.txt", "w") as f:
            f.write("should not be")
        out["data"] = "writable"
    except OSError as exc:
        out["data"] = type(exc).__name__
    return out


async def test_the_process_backend_refuses_volumes(client: AsyncClient) -> None:
    job = await client.submit_call(read_volume, gpu=0.1, duration=600, volumes={"data": "/data"})
    with pytest.raises(InvalidArgument, match="docker and swarm backends only"):
        await job.result()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["docker", "swarm"])
async def test_container_jobs_mount_offered_folders_only(
    kind: str, make_stack: StackFactory, tmp_path: Path
) -> None:
    from tests.runner.conftest import need

    need(kind)
    data, scratch = tmp_path / "data", tmp_path / "scratch"
    for folder in (data, scratch):
        folder.mkdir()
        folder.chmod(0o777)
    (data / "hello.txt").write_text("hello from the host")
    (data / "hello.txt").chmod(0o644)
    s = await make_stack(
        workers=[f"{kind}-vol-1"],
        backend=kind,
        env={"CUMULUS_CONTAINER_VOLUMES": f"data={data}:ro,scratch={scratch}"},
    )
    async with AsyncClient(profile=s.profile()) as c:
        job = await c.submit_call(read_volume, gpu=0.1, duration=600, volumes={"data": "/data"})
        assert await job.result() == "hello from the host"
        both = {"data": "/data", "scratch": "/scratch"}
        job = await c.submit_call(write_volumes, gpu=0.1, duration=600, volumes=both)
        assert await job.result() == {"data": "OSError"}  # read-only: the operator said so
        assert (scratch / "out.txt").read_text() == "written by the job"
        assert not (data / "new.txt").exists()
        job = await c.submit_call(read_volume, gpu=0.1, duration=600, volumes={"nope": "/data"})
        with pytest.raises(InvalidArgument, match="not offered on this worker"):
            await job.result()


def test_a_bad_offer_stops_the_config_at_load() -> None:
    from shared.config import load

    with pytest.raises(ConfigError, match="container.volumes"):
        load(environ={"CUMULUS_CONTAINER_VOLUMES": "data:/srv/data"})
