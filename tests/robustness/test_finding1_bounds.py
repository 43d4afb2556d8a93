"""Issue 11, finding 1: no event derived from a request outgrows what the bus carries.

One ordinary submit (under the 1 MiB request limit) once made the scheduler's next event larger
than nats-server's max_payload: the publish failed forever and every later job stayed SUBMITTED.
The gateway bounds every field of a submit and the encoded spec as a whole
(services/gateway/policy.py, MAX_SPEC_BYTES), so the largest event a job's request leads to
(WorkerSelected, PartitionReady: the spec plus a placement) fits with room to spare.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from cumulus import AsyncClient, CumulusError, package_script
from job_image.requirements import MAX_REQUIREMENTS
from services.gateway import policy
from services.gateway.secrets import MAX_NAME, MAX_SECRETS, MAX_VALUE_BYTES
from services.stack import Stack
from shared import api, bus
from shared import events as ev
from shared.telemetry import new_trace

MIB = 1024 * 1024
MAX_JOB_ID = 64
"""A job id is one subject token (shared/subjects.py)."""


def one() -> int:
    return 1


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> AsyncIterator[Stack]:
    """A stack of this module's own (it overrides the session's): before the fix, the first
    test here wedged its scheduler for good."""
    s = Stack(
        data_dir=tmp_path_factory.mktemp("bounds"),
        workers=["worker-1"],
        devices="2x16GiB",
        env={"CUMULUS_CONTAINER_WHEELHOUSE": str(wheelhouse)},
    )
    try:
        await s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("script") / "main.py"
    path.write_text("print('ok')\n")
    return package_script(path)


def header_bytes(headers: dict[str, str]) -> int:
    """Bytes of a NATS header block (they count against max_payload with the data)."""
    return len(b"NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n".encode()) for k, v in headers.items())


def wire_size(event: ev.JobEvent) -> int:
    return len(ev.encode(event)) + header_bytes(bus.headers(event.event_id, event.trace))


async def test_a_submit_whose_events_would_outgrow_the_bus_is_refused(
    stack: Stack, client: AsyncClient, script: bytes
) -> None:
    ref = await client.upload(script)
    limit = client.nc.max_payload
    job_id = "outgrows-the-bus"
    # The request is under the bus's limit and so is its JobSubmitted (30 bytes to spare), but
    # the scheduler's WorkerSelected adds the worker and the devices to the same spec.
    base = ev.JobSubmitted(
        event_id=f"submit-{job_id}",
        job_id=job_id,
        user="default",
        trace=new_trace(),
        spec=ev.JobSpec(code_ref=ref, entrypoint="", gpu_tenths=1, duration_s=600),
    )
    entrypoint = "x" * (limit - 30 - wire_size(base))
    body = {
        "code_ref": ref,
        "gpu": 0.1,
        "duration": 600,
        "job_id": job_id,
        "entrypoint": entrypoint,
    }
    with pytest.raises(CumulusError) as info:
        await api.request(client.nc, "submit", body, api.SubmitReply, timeout=10)
    assert info.value.code == "INVALID_ARGUMENT"
    assert f"{len(entrypoint)} characters" in info.value.message
    assert str(policy.MAX_ENTRYPOINT) in info.value.message
    # The queue keeps moving.
    assert await client.run(one, gpu=0.1, duration=600, logs=None, timeout=60) == 1


async def test_a_spec_over_its_budget_is_refused_with_its_size_and_the_limit(
    client: AsyncClient, script: bytes
) -> None:
    # Each field within its own bound, but control characters take 6 bytes each encoded
    # (\u0001): 128 KiB of env values is 768 KiB of spec.
    ref = await client.upload(script)
    env = {f"V{i}": "\x01" * (16 * 1024) for i in range(8)}
    body = {"code_ref": ref, "gpu": 0.1, "duration": 600, "entrypoint": "main.py", "env": env}
    with pytest.raises(CumulusError) as info:
        await api.request(client.nc, "submit", body, api.SubmitReply, timeout=10)
    assert info.value.code == "INVALID_ARGUMENT"
    message = info.value.message
    assert "bytes encoded" in message
    assert str(policy.spec_limit(client.nc.max_payload)) in message
    assert await client.run(one, gpu=0.1, duration=600, logs=None, timeout=60) == 1


def secret_name(i: int) -> str:
    return f"S{i:03d}_".ljust(MAX_NAME, "X")


def maximal_requirements() -> list[str]:
    """MAX_REQUIREMENTS lines, MAX_REQUIREMENTS_BYTES in all, each with a marker that is false
    on every worker (pip skips them: the job installs nothing)."""
    each = policy.MAX_REQUIREMENTS_BYTES // MAX_REQUIREMENTS - 6  # quotes, escapes, commas
    lines = []
    for i in range(MAX_REQUIREMENTS):
        head = f'p{i:03d}; os_name == "'
        lines.append(head + "z" * (each - len(head) - 1) + '"')
    return lines


def maximal_secret_value() -> str:
    """A value such that env and secrets together are MAX_JOB_ENV_BYTES."""
    names = MAX_SECRETS * MAX_NAME
    return "s" * ((policy.MAX_JOB_ENV_BYTES - policy.MAX_ENV_TOTAL - names) // MAX_SECRETS)


def maximal_env() -> dict[str, str]:
    """MAX_ENV_NAMES variables, MAX_ENV_TOTAL bytes in all."""
    names = [f"PAD_{i:03d}" for i in range(policy.MAX_ENV_NAMES)]
    each = policy.MAX_ENV_TOTAL // len(names) - len(names[0])
    assert each <= policy.MAX_ENV_VALUE
    return {name: "v" * each for name in names}


def maximal_submit(code_ref: str, job_id: str) -> dict[str, object]:
    return {
        "code_ref": code_ref,
        "gpu": 0.1,
        "duration": 600,
        "job_id": job_id,
        "entrypoint": "e" * policy.MAX_ENTRYPOINT,
        "requirements": maximal_requirements(),
        "priority": 100,  # policy.max_priority's default
        "env": maximal_env(),
        "secrets": [secret_name(i) for i in range(MAX_SECRETS)],
    }


def test_every_field_at_its_limit_fits_the_spec_budget() -> None:
    """What each field's own bound allows, all at once, is within MAX_SPEC_BYTES: the budget
    refuses only what escaping inflates."""
    body = maximal_submit("0" * 64, "j" * MAX_JOB_ID)
    spec = ev.JobSpec(
        code_ref=str(body["code_ref"]),
        entrypoint=str(body["entrypoint"]),
        requirements=maximal_requirements(),
        gpu_tenths=80,
        duration_s=86400,
        priority=100,
        env=maximal_env(),
        secrets=[secret_name(i) for i in range(MAX_SECRETS)],
    )
    assert len(msgspec.json.encode(spec.requirements)) <= policy.MAX_REQUIREMENTS_BYTES
    assert policy.spec_size(spec) <= policy.MAX_SPEC_BYTES


def test_the_largest_derived_events_fit_a_default_bus_with_margin() -> None:
    """A spec at the budget, placed on 8 devices with the longest ids: WorkerSelected and
    PartitionReady (the largest events a request leads to) stay under 1 MiB with room."""
    limit = policy.spec_limit(MIB)
    assert limit == policy.MAX_SPEC_BYTES
    # Escape-heavy values make the spec exactly `limit` bytes encoded.
    spec = ev.JobSpec(code_ref="0" * 64, env={"PAD": ""}, gpu_tenths=80)
    short = limit - policy.spec_size(spec)
    pad = "\x01" * (short // 6) + "v" * (short % 6)
    spec = ev.JobSpec(code_ref="0" * 64, env={"PAD": pad}, gpu_tenths=80)
    assert policy.spec_size(spec) == limit
    job, user, worker = "j" * MAX_JOB_ID, "u" * 64, "w" * 64
    devices = list(range(8))
    placed = ev.WorkerSelected(
        job_id=job,
        user=user,
        worker_id=worker,
        trace=new_trace(),
        spec=spec,
        devices=devices,
        tenths=10,
        attempt=10**6,
    )
    ready = ev.PartitionReady(
        job_id=job,
        user=user,
        worker_id=worker,
        trace=new_trace(),
        spec=spec,
        attempt=10**6,
        partition_ids=[f"{'p' * 64}-{d}" for d in devices],
        devices=devices,
        env={
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, devices)),
            "NVIDIA_VISIBLE_DEVICES": ",".join(map(str, devices)),
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": ",".join(f"{d}=81920M" for d in devices),
        },
        expires_at=1e12,
    )
    for event in (placed, ready):
        size = wire_size(event)
        assert size - limit < policy.EVENT_HEADROOM  # what a placement adds to its spec
        assert size < MIB - 256 * 1024, f"{type(event).__name__} is {size} bytes"


async def test_a_submit_with_every_field_at_its_limit_runs_and_the_queue_keeps_moving(
    stack: Stack, script: bytes
) -> None:
    async with AsyncClient(profile=stack.profile("maximal")) as client:
        for i in range(MAX_SECRETS):
            await client.set_secret(secret_name(i), maximal_secret_value())
        ref = await client.upload(script)
        body = maximal_submit(ref, "m" * MAX_JOB_ID)
        reply = await api.request(
            client.nc, "submit", body, api.SubmitReply, timeout=30, user="maximal"
        )
        assert reply.status == "SUBMITTED"
        status = await client.get_job(reply.job_id).wait(timeout=120)
        if status != "COMPLETED":
            lines = [line.text[:300] async for line in client.get_job(reply.job_id).logs()]
            raise AssertionError("\n".join(lines[-20:]))
        assert await client.run(one, gpu=0.1, duration=600, logs=None, timeout=60) == 1


async def test_a_job_whose_environment_could_not_start_a_process_is_refused(
    stack: Stack, script: bytes
) -> None:
    async with AsyncClient(profile=stack.profile("heavy")) as client:
        names = [f"BIG_{i}" for i in range(32)]
        for name in names:
            await client.set_secret(name, "s" * MAX_VALUE_BYTES)  # 1 MiB in all
        ref = await client.upload(script)
        body = {"code_ref": ref, "entrypoint": "main.py", "secrets": names, "env": {"A": "b"}}
        with pytest.raises(CumulusError) as info:
            await api.request(client.nc, "submit", body, api.SubmitReply, user="heavy")
        assert info.value.code == "INVALID_ARGUMENT"
        assert f"at most {policy.MAX_JOB_ENV_BYTES} are accepted" in info.value.message
        # The same secrets but fewer of them run.
        body["secrets"] = names[:8]
        reply = await api.request(client.nc, "submit", body, api.SubmitReply, user="heavy")
        assert await client.get_job(reply.job_id).wait(timeout=60) == "COMPLETED"
