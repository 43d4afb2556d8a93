"""Secrets: stored encrypted by their owner, delivered only into the job's environment.

Through a real stack (nats-server with identities, the gateway's SQLite secret store, the
runner on the process backend): a job gets its secret; the value is in none of the job's
events (as its owner reads them and as the raw JOBS stream holds them), none of the services'
logs and no file of the data directory; a job printing it shows `***`. Another user can
neither use nor list it; another worker cannot fetch it; reserved names are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import stat
import time
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from cumulus import AsyncClient, CumulusError, InvalidArgument, NotFound, package_function
from cumulus._options import JobOptions
from services.gateway.app import secrets_holder
from services.gateway.secrets import MAX_VALUE_BYTES, SecretStore
from services.gateway.state import JobTable
from services.runner import handlers
from services.runner import state as st
from services.stack import Stack
from shared import api, auth, subjects
from shared import events as ev
from shared.errors import ApiUnreachable, PermissionDenied


def show_token() -> str:
    value = os.environ["API_TOKEN"]
    print(f"token={value}")
    print(f"again {value} and {value}!")
    return hashlib.sha256(value.encode()).hexdigest()


def leak_in_error() -> None:
    raise RuntimeError(f"bad token {os.environ['API_TOKEN']}")


def wait_long() -> str:
    time.sleep(60)
    return "slept"


async def _client(stack: Stack, user: str) -> AsyncClient:
    return await AsyncClient(profile=stack.profile(user)).connect()


async def _raw_events(nc: NatsClient, job_id: str) -> list[bytes]:
    """Every message of the job as the JOBS and LOGS streams hold it (the operator's view)."""
    js = nc.jetstream()
    out: list[bytes] = []
    for subject in (subjects.job_all(job_id), subjects.job_logs(job_id)):
        sub = await js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                out.append(msg.data)
        finally:
            await sub.unsubscribe()
    return out


async def _job_dirs_gone(stack: Stack, job_id: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(stack.data_dir.glob(f"runner-*/{job_id}.*")):
        assert time.monotonic() < deadline, "the job's directory was not cleaned up"
        await asyncio.sleep(0.1)


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


async def test_a_job_gets_its_secret_and_it_leaks_nowhere(stack: Stack, nc: NatsClient) -> None:
    value = f"tok-{secrets.token_hex(16)}"
    alice = await _client(stack, "alice")
    try:
        await alice.set_secret("API_TOKEN", value)
        assert "API_TOKEN" in await alice.secrets()
        job = await alice.submit_package(
            package_function(show_token), gpu=0.1, duration=600, secrets=["API_TOKEN"]
        )
        assert await job.result(timeout=60) == hashlib.sha256(value.encode()).hexdigest()
        lines = [line.text async for line in job.logs()]
        assert lines == ["token=***", "again *** and ***!"]
        failing = await alice.submit_package(
            package_function(leak_in_error), gpu=0.1, duration=600, secrets=["API_TOKEN"]
        )
        with pytest.raises(CumulusError) as raised:
            await failing.result(timeout=60)
        assert "bad token ***" in raised.value.message
        assert value not in raised.value.message + raised.value.remote_traceback
        for handle in (job, failing):
            seen = [e async for e in handle.events(follow=False)]
            assert isinstance(seen[0], ev.JobSubmitted)
            assert seen[0].spec.secrets == ["API_TOKEN"]
            assert all(value.encode() not in ev.encode(e) for e in seen)
            raw = await _raw_events(nc, handle.job_id)
            assert len(raw) >= len(seen)
            assert all(value.encode() not in data for data in raw)
            status = await handle.status()
            assert value not in repr(status)
            await _job_dirs_gone(stack, handle.job_id)
    finally:
        await alice.close()
    logs = list((stack.data_dir / "logs").glob("*.log"))
    assert logs
    assert [p for p in logs if value.encode() in p.read_bytes()] == []
    # No file of the data directory (SQLite files, the JetStream store, the launchers' and
    # runners' files) holds the value in plaintext.
    assert _files_holding(stack.data_dir, value.encode()) == []
    key = stack.data_dir / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


async def test_another_user_can_neither_use_nor_list_a_secret(stack: Stack) -> None:
    alice = await _client(stack, "alice")
    bob = await _client(stack, "bob")
    try:
        await alice.set_secret("SHARED_NAME", "alice's value")
        assert "SHARED_NAME" not in await bob.secrets()
        with pytest.raises(InvalidArgument, match="Unknown secret SHARED_NAME"):
            await bob.submit_package(
                package_function(show_token), gpu=0.1, duration=600, secrets=["SHARED_NAME"]
            )
        with pytest.raises(NotFound):
            await bob.delete_secret("SHARED_NAME")
        # Bob's secret of the same name is his own: alice's is untouched.
        await bob.set_secret("SHARED_NAME", "bob's value")
        await bob.delete_secret("SHARED_NAME")
        assert "SHARED_NAME" in await alice.secrets()
        await alice.delete_secret("SHARED_NAME")
        assert "SHARED_NAME" not in await alice.secrets()
        with pytest.raises(InvalidArgument, match="Unknown secret SHARED_NAME"):
            await alice.submit_package(
                package_function(show_token), gpu=0.1, duration=600, secrets=["SHARED_NAME"]
            )
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("CUDA_VISIBLE_DEVICES", "Cumulus owns CUDA_"),
        ("LD_PRELOAD", "Cumulus owns LD_"),
        ("PATH", "Cumulus owns it"),
        ("PYTHONPATH", "Python interpreter"),
        ("lower_case", "Invalid secret name"),
        ("1ST", "Invalid secret name"),
        ("A.B", "Invalid secret name"),
    ],
)
async def test_reserved_and_invalid_names_are_refused(
    stack: Stack, client: AsyncClient, name: str, why: str
) -> None:
    with pytest.raises(InvalidArgument, match=why):
        await client.set_secret(name, "value")
    with pytest.raises(InvalidArgument):
        await client.submit_package(
            package_function(show_token), gpu=0.1, duration=600, secrets=[name]
        )


async def test_values_and_env_collisions_are_checked(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument, match="bytes; the most is"):
        await client.set_secret("BIG", "x" * (MAX_VALUE_BYTES + 1))
    await client.set_secret("MY_KEY", "value-1")
    with pytest.raises(InvalidArgument, match="both in the job's env and one of its secrets"):
        await client.submit_package(
            package_function(show_token),
            gpu=0.1,
            duration=600,
            env={"MY_KEY": "x"},
            secrets=["MY_KEY"],
        )
    await client.delete_secret("MY_KEY")


async def test_another_worker_cannot_fetch_a_jobs_secrets(stack: Stack) -> None:
    alice = await _client(stack, "alice")
    stack.credentials("worker", "worker-2", ("worker-2",))
    stack.reload()
    creds = auth.load_credentials(stack.credentials("worker", "worker-2", ("worker-2",)))
    intruder = await nats.connect(stack.url, **auth.connect_options(creds))
    try:
        await alice.set_secret("SLEEPY_TOKEN", "the-sleepy-value")
        job = await alice.submit_package(
            package_function(wait_long), gpu=0.1, duration=600, secrets=["SLEEPY_TOKEN"]
        )
        deadline = time.monotonic() + 60
        while (await job.status()).status != "RUNNING":
            assert time.monotonic() < deadline, "the job did not start"
            await asyncio.sleep(0.2)
        assert (await job.status()).worker_id == "worker-1"
        body = api.SecretsRequest(job_id=job.job_id)
        # Its own subject: the gateway answers, but the job is not placed on worker-2.
        with pytest.raises(PermissionDenied, match="not running on worker-2"):
            await api.request(
                intruder, subjects.secrets_request("worker-2"), body, api.SecretsReply
            )
        # worker-1's subject: NATS refuses the publish, nobody answers.
        with pytest.raises(ApiUnreachable):
            await api.request(
                intruder,
                subjects.secrets_request("worker-1"),
                body,
                api.SecretsReply,
                timeout=1.0,
            )
        await job.cancel()
    finally:
        await intruder.close()
        await alice.close()


# -- the parts, without a stack --------------------------------------------------------------


async def test_the_store_keeps_values_encrypted_and_users_apart(
    tmp_path: Path, nc: NatsClient, stack: Stack
) -> None:
    """Two gateways (two stores, one bucket) that share the key see the same secrets; the
    bucket and every file hold ciphertext only."""
    js = nc.jetstream()
    first = await SecretStore.open(js, tmp_path / "g1")
    (tmp_path / "g2").mkdir()
    (tmp_path / "g2" / "secrets.key").write_bytes((tmp_path / "g1" / "secrets.key").read_bytes())
    second = await SecretStore.open(js, tmp_path / "g2")
    value = f"plain-{secrets.token_hex(8)}"
    user = f"alice{secrets.token_hex(3)}"
    assert await first.put(user, "TOKEN", value) is True
    assert await second.put(user, "TOKEN", value) is False  # the other gateway sees it
    assert await second.names(user) == ["TOKEN"]
    assert await first.names(f"bob{secrets.token_hex(3)}") == []
    assert await second.values(user, ["TOKEN"]) == {"TOKEN": value}
    with pytest.raises(NotFound):
        await first.values(f"bob{secrets.token_hex(3)}", ["TOKEN"])
    stored = await js.get_last_msg("KV_cumulus-secrets", f"$KV.cumulus-secrets.{user}.TOKEN")
    assert value.encode() not in (stored.data or b"")
    assert _files_holding(tmp_path, value.encode()) == []
    assert _files_holding(stack.data_dir, value.encode()) == []  # the bus's store included
    assert stat.S_IMODE((tmp_path / "g1" / "secrets.key").stat().st_mode) == 0o600
    # A gateway with another key cannot read them, and says why.
    stranger = await SecretStore.open(js, tmp_path / "g3")
    with pytest.raises(CumulusError, match="same secrets.key"):
        await stranger.values(user, ["TOKEN"])
    await second.delete(user, "TOKEN")
    with pytest.raises(NotFound):
        await first.delete(user, "TOKEN")
    assert await first.names(user) == []


def test_only_the_worker_a_running_job_is_placed_on_gets_its_secrets() -> None:
    table = JobTable()
    spec = ev.JobSpec(code_ref="c", secrets=["TOKEN"])
    table.apply(ev.JobSubmitted(event_id="s", job_id="j1", user="alice", spec=spec))
    with pytest.raises(PermissionDenied):  # not placed yet
        secrets_holder(table, "worker-1", "j1")
    table.apply(
        ev.WorkerSelected(
            event_id="p",
            job_id="j1",
            user="alice",
            worker_id="worker-1",
            spec=spec,
            devices=[0],
            tenths=1,
        )
    )
    assert secrets_holder(table, "worker-1", "j1").user == "alice"
    with pytest.raises(PermissionDenied):
        secrets_holder(table, "worker-2", "j1")
    with pytest.raises(PermissionDenied):
        secrets_holder(table, "worker-1", "no-such-job")
    table.apply(
        ev.JobCancelled(event_id="c", job_id="j1", user="alice", worker_id="worker-1", message="")
    )
    with pytest.raises(PermissionDenied):  # over
        secrets_holder(table, "worker-1", "j1")


def test_options_take_secret_names() -> None:
    assert JobOptions(secrets=["A", "B"]).secrets == ("A", "B")
    assert JobOptions(secrets="A").secrets == ("A",)
    with pytest.raises(InvalidArgument):
        JobOptions(secrets=[""])


def test_masks_cover_values_and_their_lines() -> None:
    masks = handlers.secret_masks(["abc", "long-value", "line-one\nline-two"])
    assert "abc" not in masks  # too short to mask
    assert masks[0] == "line-one\nline-two"
    assert handlers.mask("x long-value y line-two", masks) == "x *** y ***"
    lines = handlers.mask_lines([ev.LogLine("stdout", "=long-value=")], masks)
    assert lines == [ev.LogLine("stdout", "=***=")]
    failed = ev.JobFailed(
        job_id="j", code="INTERNAL", message="bad long-value", traceback="at long-value"
    )
    masked = handlers.mask_ending(failed, masks)
    assert isinstance(masked, ev.JobFailed)
    assert (masked.message, masked.traceback) == ("bad ***", "at ***")


def test_secrets_never_override_what_cumulus_sets() -> None:
    spec = ev.JobSpec(code_ref="c", env={"MODE": "x"}, secrets=["TOKEN", "PATH"])
    job = st.RunJob(
        job_id="j",
        user="alice",
        spec=spec,
        attempt=1,
        env={"CUDA_VISIBLE_DEVICES": "0"},
        partition_ids=["p"],
    )
    env = handlers.job_env(
        job, "worker-1", {"PATH": "/usr/bin"}, 1, secrets={"TOKEN": "t", "PATH": "/evil"}
    )
    assert env["TOKEN"] == "t"
    assert env["PATH"] == "/usr/bin"
    assert env["MODE"] == "x"
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


async def test_a_listing_always_shows_every_live_secret_and_leaves_no_consumer(
    tmp_path: Path, nc: NatsClient, stack: Stack
) -> None:
    """Listings race the bus's delivery (CI once saw a user's only secret listed as []): many
    at once each show exactly the live secrets, never a deleted one, and each listing's
    consumer is gone after it."""
    js = nc.jetstream()
    store = await SecretStore.open(js, tmp_path / "g")
    user = f"carol{secrets.token_hex(3)}"
    for name in ("A_ONE", "B_TWO", "GONE"):
        await store.put(user, name, "v")
    await store.delete(user, "GONE")
    before = (await js.stream_info("KV_cumulus-secrets")).state.consumer_count
    listings = await asyncio.gather(*(store.names(user) for _ in range(300)))
    assert [names for names in listings if names != ["A_ONE", "B_TWO"]] == []
    assert (await js.stream_info("KV_cumulus-secrets")).state.consumer_count == before
