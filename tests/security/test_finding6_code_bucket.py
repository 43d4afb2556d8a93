"""Finding 6: anyone could store objects of any size in the code bucket (1.7 GB were kept after
refused submits).

Now users have no JetStream or object-store API at all; a package reaches the bucket only
through the gateway's `upload`, which checks its hash, that it is a safe package, and the user's
`policy.stored_bytes` before storing it as `<user>.<sha256>`. A refused package leaves nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from cumulus import (
    AsyncClient,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    package_function,
)
from services.stack import Stack
from shared import api, subjects
from tests.security.conftest import Identity, publish_denied


def add(a: int, b: int) -> int:
    return a + b


def echo(data: bytes) -> int:
    return len(data)


async def stored_names(admin: NatsClient) -> list[str]:
    store = await admin.jetstream().object_store(subjects.CODE_BUCKET)
    try:
        return [info.name for info in await store.list() if not info.deleted]
    except nats.js.errors.NotFoundError:
        return []


def with_traversal(package: bytes) -> bytes:
    out = io.BytesIO(package)
    with zipfile.ZipFile(out, "a") as z:
        z.writestr("../../../../tmp/evil.py", "print('escaped')\n")
    return out.getvalue()


async def upload_raw(client: AsyncClient, user: str, data: bytes, ref: str) -> Any:
    body = {"code_ref": ref, "size": len(data), "offset": 0, "data": data}
    return await api.request(client.nc, "upload", body, dict, user=user, timeout=5)


async def test_users_cannot_touch_the_object_store(
    stack: Stack, identity: Any, admin: NatsClient
) -> None:
    bob: Identity = await identity(stack.profile("bob"))
    before = await stored_names(admin)
    bucket = subjects.CODE_BUCKET
    ref = hashlib.sha256(b"x").hexdigest()
    await publish_denied(bob, admin, f"$O.{bucket}.C.bobchunk", b"x" * 1024)
    await publish_denied(bob, admin, f"$O.{bucket}.M.alice.{ref}", b"{}")
    for subject in (
        f"$JS.API.STREAM.INFO.OBJ_{bucket}",
        f"$JS.API.STREAM.PURGE.OBJ_{bucket}",
        f"$JS.API.DIRECT.GET.OBJ_{bucket}.$O.{bucket}.M.>",
        f"$JS.API.CONSUMER.CREATE.OBJ_{bucket}",
        "$JS.API.STREAM.CREATE.OBJ_bobs",
    ):
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await bob.nc.request(subject, b"{}", timeout=1.0)
    assert await stored_names(admin) == before


@pytest.mark.parametrize(
    "make",
    [with_traversal, lambda p: b"not a package at all", lambda p: p[: len(p) // 2]],
    ids=["zip-traversal", "not-a-package", "truncated"],
)
async def test_a_bad_package_is_refused_and_leaves_nothing(
    alice: AsyncClient, admin: NatsClient, make: Any
) -> None:
    data = make(package_function(add, (1, os.urandom(8).hex())))
    with pytest.raises(InvalidArgument):
        await alice.upload(data)
    ref = hashlib.sha256(data).hexdigest()
    assert subjects.code_object("alice", ref) not in await stored_names(admin)


async def test_a_package_that_does_not_hash_to_its_code_ref_is_refused(
    alice: AsyncClient, admin: NatsClient
) -> None:
    data = package_function(add, (1, os.urandom(8).hex()))
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(InvalidArgument) as refused:
        await upload_raw(alice, "alice", data, claimed)
    assert "sha256" in str(refused.value)
    names = await stored_names(admin)
    assert subjects.code_object("alice", claimed) not in names
    assert subjects.code_object("alice", hashlib.sha256(data).hexdigest()) not in names


async def test_bob_cannot_run_alices_code_or_read_her_results(
    alice: AsyncClient, bob: AsyncClient
) -> None:
    job = await alice.submit(add, 20, 22, gpu=0.1, duration=600)
    assert await job.result(timeout=60) == 42
    ref = await alice.upload(package_function(add, (20, 22)))
    with pytest.raises(InvalidArgument) as refused:
        await bob._call("submit", {"code_ref": ref, "gpu": 0.1, "duration": 600}, dict)
    assert "not found" in str(refused.value)
    with pytest.raises(NotFound):  # a result travels in the job's events, which are alice's
        await bob._call("watch", {"job_id": job.job_id, "deliver": bob.nc.new_inbox()}, dict)


async def test_uploads_are_bounded_by_the_users_quota(make_stack: Any) -> None:
    s: Stack = await make_stack(env={"CUMULUS_POLICY_STORED_BYTES": "64KiB"})
    admin = await s.connect()
    try:
        async with AsyncClient(profile=s.profile("alice")) as alice:
            small = package_function(echo, (os.urandom(1024),))
            await alice.upload(small)  # within the quota
            big = package_function(echo, (os.urandom(100 * 1024),))
            with pytest.raises(ResourceExhausted) as refused:
                await alice.upload(big)
            assert "policy.stored_bytes" in str(refused.value)
            names = await stored_names(admin)
            assert subjects.code_object("alice", hashlib.sha256(big).hexdigest()) not in names
            assert subjects.code_object("alice", hashlib.sha256(small).hexdigest()) in names
            # and a declared size beyond the quota is refused before it is sent
            body = {
                "code_ref": hashlib.sha256(b"y").hexdigest(),
                "size": 60 * 1024 * 1024,
                "offset": 0,
                "data": b"y",
            }
            with pytest.raises(ResourceExhausted):
                await api.request(alice.nc, "upload", body, dict, user="alice", timeout=5)
    finally:
        await admin.close()


async def test_bob_cannot_block_alices_uploads(make_stack: Any) -> None:
    """Unfinished uploads are held by the gateway: one user's must not crowd out another's."""
    s: Stack = await make_stack()
    async with (
        AsyncClient(profile=s.profile("bob")) as bob,
        AsyncClient(profile=s.profile("alice")) as alice,
    ):
        refused = 0
        for i in range(80):  # bounded: more than the gateway holds for everyone
            body = {
                "code_ref": hashlib.sha256(f"pending {i}".encode()).hexdigest(),
                "size": 64 * 1024 * 1024 - 1,
                "offset": 0,
                "data": b"x",
            }
            try:
                await api.request(bob.nc, "upload", body, dict, user="bob", timeout=5)
            except (ResourceExhausted, InvalidArgument):
                refused += 1
        assert refused > 0  # bob is limited ...
        ref = await alice.upload(package_function(add, (1, 2)))  # ... alice is not
        assert len(ref) == 64
