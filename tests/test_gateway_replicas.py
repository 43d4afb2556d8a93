"""Gateways as replicas (docs/deploy.md): two gateway processes behind the API's queue group.

Requests spread over them, so what one gateway keeps in memory must not be needed by the other:
a large package's chunks go to the replica that holds its first ones (it names itself in its
reply), a replica that is gone sends the uploader back to the start on another, secrets are in
the bus's bucket. Real nats-server with identities, real gateway processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cumulus import AsyncClient, package_script
from cumulus._client import UPLOAD_CHUNK, _start_again
from cumulus._packaging import code_ref
from services.stack import Stack
from shared import api, subjects
from shared.errors import CumulusError
from tests.conftest import StackFactory

pytestmark = pytest.mark.slow


def _big_package(tmp_path: Path, name: str, size: int = 3 * UPLOAD_CHUNK) -> bytes:
    """A valid script package of about `size` bytes (random data does not compress)."""
    work = tmp_path / name
    work.mkdir()
    (work / "main.py").write_text("print(open('blob.bin', 'rb').read(4).hex())\n")
    (work / "blob.bin").write_bytes(os.urandom(size))
    return package_script(work / "main.py", working_dir=work)


@pytest.fixture
async def replicas(make_stack: StackFactory) -> Stack:
    return await make_stack(gateways=2, devices="2x16GiB")


async def test_large_uploads_and_jobs_work_through_two_replicas(
    replicas: Stack, tmp_path: Path
) -> None:
    packages = [_big_package(tmp_path, f"p{i}") for i in range(6)]
    async with AsyncClient(profile=replicas.profile()) as client:
        for package in packages:  # each is 4 chunks: without stickiness most would fail
            assert await client.upload(package) == code_ref(package)
        await client.set_secret("TOKEN", "s3cret-value")
        job = await client.submit_package(packages[0], entrypoint="main.py", secrets=["TOKEN"])
        assert (await job.result(timeout=60)) is None
        assert "TOKEN" in await client.secrets()  # whichever replica answers
    assert replicas.procs["gateway"].alive()
    assert replicas.procs["gateway-2"].alive()


async def test_a_chunk_for_a_replica_that_is_gone_or_forgot_says_start_again(
    replicas: Stack, tmp_path: Path
) -> None:
    package = _big_package(tmp_path, "p")
    ref = code_ref(package)
    user = "default"
    replicas.profile(user)
    nc = await replicas.connect("user", user)
    try:
        first = await api.request(
            nc,
            "upload",
            {"code_ref": ref, "size": len(package), "offset": 0, "data": package[:UPLOAD_CHUNK]},
            dict,
            user=user,
        )
        holder = str(first["gateway"])
        assert holder in ("g1", "g2")
        assert first["stored"] is False
        assert first["received"] == UPLOAD_CHUNK
        other = "g2" if holder == "g1" else "g1"
        second = {
            "code_ref": ref,
            "size": len(package),
            "offset": UPLOAD_CHUNK,
            "data": package[UPLOAD_CHUNK : 2 * UPLOAD_CHUNK],
        }
        # The other replica never saw the first chunk: out of order, start again.
        with pytest.raises(CumulusError) as forgot:
            await api.request(nc, subjects.api(f"upload.{other}", user), second, dict)
        assert forgot.value.code == "INVALID_ARGUMENT"
        assert _start_again(forgot.value)
        # The holder is stopped: nobody answers on its subject.
        replicas.procs["gateway" if holder == "g1" else "gateway-2"].stop()
        with pytest.raises(CumulusError) as gone:
            await api.request(nc, subjects.api(f"upload.{holder}", user), second, dict, timeout=2.0)
        assert gone.value.code == "UNAVAILABLE"
        assert _start_again(gone.value)
    finally:
        await nc.close()
    # The client, told by nobody, uploads the whole package again on the replica left.
    async with AsyncClient(profile=replicas.profile(user)) as client:
        assert await client.upload(package) == ref


def test_only_out_of_order_and_unavailable_restart_an_upload() -> None:
    assert _start_again(CumulusError.from_code("UNAVAILABLE", "away"))
    assert _start_again(CumulusError.from_code("INVALID_ARGUMENT", "x", {"field": "offset"}))
    wrong = CumulusError.from_code("INVALID_ARGUMENT", "does not match", {"field": "code_ref"})
    assert not _start_again(wrong)
    assert not _start_again(CumulusError.from_code("RESOURCE_EXHAUSTED", "quota"))
