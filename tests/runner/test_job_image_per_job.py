"""A job's own image (`image=`, `cumulus run --image`) on the container backends, from the
operator's allow-list (`policy.images`, shared/images.py): an allowed image built FROM the
job image runs the job; an image the list does not allow is PERMISSION_DENIED at submit; a
malformed reference is INVALID_ARGUMENT before anything is uploaded; an allowed image missing
on the worker's engine fails the job naming it; the process backend refuses the job rather
than running it without its image."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from cumulus import AsyncClient, InvalidArgument, JobOptions, PermissionDenied
from shared import images
from shared.errors import ConfigError
from tests.conftest import StackFactory
from tests.runner.conftest import IMAGE

CUMULUS = str(Path(sys.executable).parent / "cumulus")
MARKER = "/opt/cumulus-test-marker.txt"


def test_references_and_the_allow_list_are_checked() -> None:
    for good in (
        "cumulus-job",
        "cumulus-job-torch:2.4",
        "team/img:v1",
        "registry.example:5000/team/img@sha256:" + "a" * 64,
    ):
        assert images.check_reference(good) == good
    for bad in ("Upper:1", "img:", "img::1", "/img", "a b", "img@sha256:zz", "x" * 300):
        with pytest.raises(InvalidArgument, match="Invalid image"):
            images.check_reference(bad)
    with pytest.raises(InvalidArgument, match="Invalid image"):
        JobOptions(image="Not An Image")  # refused before anything is uploaded
    default = "cumulus-job:latest"
    assert images.allowed("cumulus-job", "", default)  # the job image, always
    assert images.allowed("team/img:v1", ["team/*"], default)
    assert images.allowed("extra", "other:1, extra:latest", default)  # no tag: :latest
    assert not images.allowed("team2/img:v1", ["team/*"], default)
    with pytest.raises(PermissionDenied, match=r"Image evil:1 is not allowed.*policy\.images"):
        images.check_allowed("evil:1", ["team/*"], default, "alice")
    with pytest.raises(InvalidArgument, match="docker or swarm backend"):
        images.refuse_without_containers("team/img:v1", "process")
    images.refuse_without_containers("team/img:v1", "docker")


def test_a_bad_allow_list_stops_the_config_at_load(tmp_path: Path) -> None:
    from shared.config import load

    assert load(environ={"CUMULUS_POLICY_IMAGES": "a:*, team/*"}).policy.images == "a:*, team/*"
    path = tmp_path / "cumulus.yaml"
    path.write_text("policy:\n  images: [team/*, '']\n")
    with pytest.raises(ConfigError, match=r"policy\.images"):
        load(path, environ={})


def read_marker() -> str:
    with open(MARKER) as f:
        return f.read().strip()


async def test_the_process_backend_refuses_an_image(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    s = await make_stack(
        workers=["proc-img-1"], backend="process", env={"CUMULUS_POLICY_IMAGES": "team/*"}
    )
    async with AsyncClient(profile=s.profile()) as c:
        with pytest.raises(PermissionDenied, match="Image other:1 is not allowed"):
            await c.submit_call(read_marker, gpu=0.1, duration=600, image="other:1")
        job = await c.submit_call(read_marker, gpu=0.1, duration=600, image="team/img:1")
        with pytest.raises(InvalidArgument, match="image= needs the docker or swarm backend"):
            await job.result()
    # the command line says the same, and a malformed reference fails before any upload
    (tmp_path / "hello.py").write_text("print('hello')\n")
    env = {**os.environ, "CUMULUS_NATS_URL": s.url, "CUMULUS_PROFILE": s.profile()}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90
        )

    out = cli("submit", "--image", "other:1", "hello.py")
    assert out.returncode == 7, out.stderr  # PERMISSION_DENIED
    assert "Image other:1 is not allowed" in out.stderr
    out = cli("submit", "--image", "Bad Ref", "hello.py")
    assert out.returncode == 2, out.stderr  # INVALID_ARGUMENT
    assert "Invalid image 'Bad Ref'" in out.stderr


@pytest.fixture(scope="module")
def extra_image() -> Iterator[str]:
    """An image FROM the job image with a marker file, removed at the end."""
    from tests.runner.conftest import need

    need("docker")
    from services.runner import spec

    client = spec.engine(timeout=120)
    tag = f"cumulus-job-test-extra:{uuid.uuid4().hex[:10]}"
    dockerfile = (
        f"FROM {IMAGE}\nUSER root\n"
        f"RUN printf 'marker from the extra image' > {MARKER} && chmod 644 {MARKER}\n"
        "USER 65534:65534\n"
    )
    try:
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        yield tag
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(tag, force=True)
        client.close()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["docker", "swarm"])
async def test_a_job_runs_in_its_allowed_image(
    kind: str, make_stack: StackFactory, extra_image: str
) -> None:
    from tests.runner.conftest import need

    need(kind)
    absent = f"cumulus-job-test-extra:absent-{uuid.uuid4().hex[:8]}"
    s = await make_stack(
        workers=[f"{kind}-img-1"],
        backend=kind,
        env={"CUMULUS_POLICY_IMAGES": "cumulus-job-test-extra:*"},
    )
    async with AsyncClient(profile=s.profile()) as c:
        job = await c.submit_call(read_marker, gpu=0.1, duration=600, image=extra_image)
        assert await job.result() == "marker from the extra image"
        job = await c.submit_call(read_marker, gpu=0.1, duration=600)  # the job image: none
        with pytest.raises(Exception, match="No such file"):
            await job.result()
        with pytest.raises(PermissionDenied, match=r"policy\.images"):
            await c.submit_call(read_marker, gpu=0.1, duration=600, image="busybox:latest")
        job = await c.submit_call(read_marker, gpu=0.1, duration=600, image=absent)
        with pytest.raises(InvalidArgument, match=f"Image {absent} is not on this worker"):
            await job.result()
