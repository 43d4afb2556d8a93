"""One trace per job, end to end, seen by a real OTLP receiver (otlp_receiver.py beside this).

A stack runs with the standard OTEL_* variables pointed at the receiver, once over OTLP/gRPC and
once over OTLP/HTTP; the test submits a job through the SDK (the asyncio client, then the
blocking one) while it holds a span of its own (its OTel provider exports over gRPC). The job's
code uses OpenTelemetry itself. The receiver must then hold one trace with the test's span, the
SDK's, the gateway's, the scheduler's, the partitioner's, the runner's, the job's own and the
user's, each with its service's name, every parent a span of the trace, and the job's phases
adding up to the latency the test measured."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cumulus import AsyncClient, Client
from shared import tracing
from tests.conftest import StackFactory
from tests.observability.otlp_receiver import OtlpReceiver, Span

ROOT = Path(__file__).resolve().parents[2]

PHASES = [
    "cumulus submit",
    "scheduler queue wait",
    "scheduler placement",
    "partitioner partition create",
    "runner start",
    "runner run",
    "runner result delivery",
]
"""The job's sequential phases, in order: from the submit to its end event."""
SLACK_S = 0.1
SLACK_SHARE = 0.1
"""What the phases may leave uncovered of the measured latency (0.1 s and a tenth of it): the
bus hops between services (~1 ms each), the end event's way to the client, clocks read at
slightly different places. Here they cover about 97% of it."""
OVERLAP_S = 0.02
"""How much neighbouring phases may overlap (with a tenth of the latency beyond it, for a
loaded machine): where one ends after the next began (the submit's reply)."""


def traced_work(x: int) -> int:
    """A job whose code uses OpenTelemetry: its span continues the job's trace."""
    from opentelemetry import trace as user_trace

    with user_trace.get_tracer("user-code").start_as_current_span("user work") as span:
        span.set_attribute("x", x)
        return x * 2


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver().start()
    try:
        yield r
    finally:
        r.stop()


class _Switch(SimpleSpanProcessor):
    """Exports while on; a process's global provider cannot be unset, so it is switched off."""

    on = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            super().on_end(span)


@pytest.fixture(scope="module")
def test_tracer(receiver: OtlpReceiver) -> Iterator[trace.Tracer]:
    """The test's own OTel set-up, the global provider (the SDK's span is made with it)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "cumulus-test"}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{receiver.grpc_port}", insecure=True)
    switch = _Switch(exporter)
    provider.add_span_processor(switch)
    trace.set_tracer_provider(provider)
    try:
        yield provider.get_tracer("test")
    finally:
        switch.on = False  # later spans (other tests' submits) go nowhere


def _blocking(profile: str) -> tuple[int, int, Any]:
    with Client(profile=profile) as client:
        t0 = time.time_ns()
        job = client.submit_call(traced_work, (21,), gpu=0.1, duration=60, network=True)
        assert job.result(timeout=60) == 42
        return t0, time.time_ns(), job


def _by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


def _complete(spans: list[Span], trace_id: str) -> bool:
    names = {s.name for s in spans if s.trace_id == trace_id}
    return {*PHASES, "gateway accept", "job function", "user work", "partitioner release"} <= names


def _spans_of(receiver: OtlpReceiver, job_id: str) -> list[Span]:
    return [s for s in receiver.spans if s.attributes.get("cumulus.job_id") == job_id]


def hold(seconds: float) -> str:
    import time as clock

    clock.sleep(seconds)
    return "held"


async def test_a_submit_outside_any_span_starts_the_trace_at_the_gateway(
    make_stack: StackFactory, receiver: OtlpReceiver
) -> None:
    """No caller span, no SDK provider: the gateway's `accept` is the trace's root. A job that
    waits for a full worker has a `queue wait` as long as the wait, with the reason."""
    stack = await make_stack(env=receiver.env("grpc"))
    async with AsyncClient(profile=stack.profile()) as client:
        blocker = await client.submit(hold, 1.5, gpu=2, duration=60)  # both devices
        await _until_started(client, blocker.job_id)
        job = await client.submit(traced_work, 1, gpu=0.2, duration=60)
        assert await job.result(timeout=60) == 2
        assert await blocker.result(timeout=60) == "held"

    def done(_: Any) -> bool:
        names = {s.name for s in _spans_of(receiver, job.job_id)}
        return {*PHASES[1:], "gateway accept", "partitioner release"} <= names

    receiver.wait(done)
    spans = _spans_of(receiver, job.job_id)
    named = _by_name(spans)
    accept = named["gateway accept"]
    assert accept.parent_id == ""
    assert {s.trace_id for s in spans} == {accept.trace_id}
    assert all(s.parent_id == accept.span_id for s in spans if s is not accept)
    waited = named["scheduler queue wait"]
    assert waited.attributes["cumulus.queued"] is True
    assert "GPU" in waited.attributes["cumulus.queue.reason"], waited.attributes
    assert waited.attributes["cumulus.placed_on"] == "JobCompleted"  # the blocker's end
    assert waited.duration_s > 0.5
    # Without network the job's process cannot reach the collector: its spans are not made,
    # and the runner's `run` span still covers it.
    assert "job function" not in named


async def _until_started(client: AsyncClient, job_id: str) -> None:
    for _ in range(200):
        if (await client.get_job(job_id).status()).status == "RUNNING":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} did not start in 10 s")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_one_trace_across_every_service_and_the_job(
    make_stack: StackFactory,
    receiver: OtlpReceiver,
    test_tracer: trace.Tracer,
    protocol: str,
) -> None:
    stack = await make_stack(env={**receiver.env(protocol), "CUMULUS_POLICY_NETWORK": "true"})
    # The job's network lets its process reach the receiver (sandboxed jobs have none).
    with test_tracer.start_as_current_span("test submits a job") as root:
        if protocol == "grpc":  # the asyncio client
            async with AsyncClient(profile=stack.profile()) as client:
                t0 = time.time_ns()
                job = await client.submit_call(
                    traced_work, (21,), gpu=0.1, duration=60, network=True
                )
                assert await job.result(timeout=60) == 42
                t1 = time.time_ns()
        else:  # the blocking client, in a thread that has the test's span as its current one
            t0, t1, job = await asyncio.to_thread(_blocking, stack.profile())
    trace_id = f"{root.get_span_context().trace_id:032x}"
    spans = [s for s in receiver.wait(lambda s: _complete(s, trace_id)) if s.trace_id == trace_id]
    named = _by_name(spans)

    # One trace, every part of Cumulus in it, each under its own service name.
    assert {s.service for s in spans} == {
        "cumulus-test",
        "cumulus-gateway",
        "cumulus-scheduler",
        "cumulus-partitioner",
        "cumulus-runner",
        "cumulus-job",
    }
    assert named["gateway accept"].protocol == protocol
    assert named["job function"].service == "cumulus-job"

    # Parent links: the test's span is the root; every other span's parent is in the trace.
    ids = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [s.name for s in roots] == ["test submits a job"]
    for s in spans:
        assert not s.parent_id or s.parent_id in ids, f"{s.name}: parent not in the trace"
    parent = {s.name: ids[s.parent_id].name for s in spans if s.parent_id}
    assert parent["cumulus submit"] == "test submits a job"
    assert parent["gateway accept"] == "cumulus submit"
    for name in PHASES[1:] + ["partitioner release"]:
        assert parent[name] == "gateway accept", name
    assert parent["job function"] == "runner run"
    assert parent["user work"] == "job function"

    # Messaging semantic conventions and the job's attributes.
    job_id = job.job_id
    accept = named["gateway accept"].attributes
    assert accept["messaging.system"] == "nats"
    assert accept["messaging.destination.name"] == f"jobs.default.{job_id}._.submitted"
    assert accept["messaging.message.id"] == f"submit-{job_id}"
    assert accept["cumulus.gpu"] == pytest.approx(0.1)
    placement = named["scheduler placement"].attributes
    assert placement["messaging.destination.name"].endswith(".scheduled")
    assert placement["cumulus.worker_id"] == "worker-1"
    assert placement["cumulus.tenths"] == 1
    create = named["partitioner partition create"].attributes
    assert create["chronos.amount_tenths"] == 1
    assert create["chronos.device"] in (0, 1)
    assert named["scheduler queue wait"].attributes["cumulus.queued"] is False
    assert named["runner start"].attributes["cumulus.backend"] == "process"
    assert named["runner result delivery"].attributes["cumulus.status"] == "COMPLETED"
    for s in spans:
        if s.service != "cumulus-test" and s.name != "user work":
            assert s.attributes.get("cumulus.job_id") == job_id, s.name

    # The phases follow one another and add up to the latency the test measured.
    phases = [named[n] for n in PHASES]
    for before, after in zip(phases, phases[1:], strict=False):
        assert after.start_ns >= before.start_ns, (before.name, after.name)
    latency = (t1 - t0) / 1e9
    total = sum(p.duration_s for p in phases)
    shown = {p.name: round(p.duration_s, 4) for p in phases}
    # The queue wait starts at the `submitted` event's time, a moment before the submit's
    # reply ends `cumulus submit`: neighbours overlap a little (tens of ms on a loaded
    # machine). Less their overlaps, the phases fit inside the measured latency.
    covered, end = 0, 0
    for p in phases:  # the length of their union: what the phases cover once
        covered += max(0, p.end_ns - max(p.start_ns, end))
        end = max(end, p.end_ns)
    union = covered / 1e9
    assert union <= latency + 0.001, (latency, union, shown)
    assert total - union <= OVERLAP_S + SLACK_SHARE * latency, (total, union, shown)
    assert latency * (1 - SLACK_SHARE) - SLACK_S <= total, (latency, total, shown)
    assert phases[0].start_ns >= t0
    assert phases[-1].end_ns <= t1
    run, own = named["runner run"], named["job function"]
    assert run.start_ns <= own.start_ns <= own.end_ns <= run.end_ns


def test_the_standard_variables_turn_tracing_on_and_pick_the_protocol() -> None:
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    assert not tracing.configured({**on, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({**on, "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.protocol({}) == "grpc"
    assert tracing.protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    both = {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
    }
    assert tracing.protocol(both) == "http/protobuf"


def test_events_carry_the_jobs_context_and_the_run_span_is_fixed() -> None:
    job = tracing.new_trace()
    assert tracing.child_trace(job) == job  # every service's span: a child of `accept`
    assert tracing.valid(tracing.child_trace("garbage"))
    assert not tracing.valid(f"00-{'0' * 32}-{'1' * 16}-01")
    run = tracing.with_span(job, tracing.derived_span_id(job, "j1", 1, "run"))
    assert run == tracing.with_span(job, tracing.derived_span_id(job, "j1", 1, "run"))
    assert run != tracing.with_span(job, tracing.derived_span_id(job, "j1", 2, "run"))
    assert run.split("-")[1] == job.split("-")[1]


def test_a_job_gets_the_exporter_settings_only_when_it_can_reach_the_collector() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_HEADERS": "a=b"}
    run = tracing.new_trace()
    assert tracing.job_env(run, False, env) == {"TRACEPARENT": run}
    assert tracing.job_env(run, True, env) == {
        "TRACEPARENT": run,
        **env,
        "OTEL_SERVICE_NAME": "cumulus-job",
    }
    assert tracing.job_env("", True, env) == {}


def test_off_makes_no_span(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_enabled", False)
    assert tracing.record("x", tracing.new_trace(), tracing.now()) == ""
    with tracing.span("x", tracing.new_trace()) as own:
        assert own == ""
    assert tracing.valid(tracing.new_root("gateway accept"))


IN_JOB = """
import sys
from job_image.tracing import job_span

with job_span("job work.py"):
    if sys.argv[1] == "uses-otel":
        from opentelemetry import trace

        with trace.get_tracer("user-code").start_as_current_span("user work"):
            pass
print("opentelemetry.trace" in sys.modules)
"""


def test_the_in_job_runner_traces_only_code_that_uses_opentelemetry(
    receiver: OtlpReceiver,
) -> None:
    run = tracing.new_trace()
    env = {
        **os.environ,
        **receiver.env("http/protobuf"),
        "TRACEPARENT": run,
        "OTEL_SERVICE_NAME": "cumulus-job",
        "PYTHONPATH": str(ROOT),
    }
    for how, imported in (("plain", "False"), ("uses-otel", "True")):
        done = subprocess.run(
            [sys.executable, "-c", IN_JOB, how], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.stdout.split() == [imported], done.stderr
    trace_id, run_span, _ = tracing.parse(run) or ("", "", "")
    spans = receiver.wait(lambda s: len([x for x in s if x.trace_id == trace_id]) >= 2)
    named = _by_name([s for s in spans if s.trace_id == trace_id])
    assert set(named) == {"job work.py", "user work"}  # none of the plain run
    assert named["job work.py"].parent_id == run_span
    assert named["job work.py"].service == "cumulus-job"
    assert named["user work"].parent_id == named["job work.py"].span_id
