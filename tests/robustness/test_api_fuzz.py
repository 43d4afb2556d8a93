"""API fuzzing (issue 11): whatever a caller sends to any gateway operation, the reply is the
operation's answer or one of the seed's error codes, never INTERNAL and never silence, and the
services keep serving.

Hypothesis draws request bodies for every operation of `cumulus.api.<user>.<op>` (and the
observers' watch and the workers' secrets request): the operation's own fields with plausible,
wrong-typed, huge, unicode, null and deeply nested values, extra fields, arbitrary JSON, and
raw bytes that are no JSON at all. One stack serves the whole module; it is driven from a loop
of its own in a thread, as hypothesis runs its examples synchronously.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from cumulus import AsyncClient, package_function, package_script
from services.gateway import app as gateway_app
from services.stack import Stack
from shared import api, subjects
from shared.errors import CODES, ERROR_CODE_HEADER, ERROR_HEADER
from shared.views import JobInfo

T = TypeVar("T")

USER = "fuzz"
REPLY_TIMEOUT = 10.0
"""Seconds an answer may take; none takes near this (a timeout is a finding)."""
EXAMPLES = 150
"""Examples per operation (the module runs in well under two minutes)."""
ALLOWED = CODES - {"INTERNAL"}
"""Every seed code but INTERNAL: bad input is the caller's error, never Cumulus's."""

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def one() -> int:
    return 1


class Loop:
    """An event loop in a thread: hypothesis's examples call into it synchronously."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass(repr=False)
class Fuzz:
    loop: Loop
    stack: Stack
    client: AsyncClient
    """The fuzzing user's own connection (its identity may publish `cumulus.api.fuzz.>`)."""
    admin: Client
    """The operator's: any subject (another user's, the observers', a worker's)."""
    code_refs: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def request(self, subject: str, body: bytes, *, admin: bool = False) -> tuple[str, str]:
        """(code, message) of the reply: code "" for success."""
        nc = self.admin if admin else self.client.nc
        if len(body) > nc.max_payload - 4096:
            return "", "too large to send"
        msg = self.loop.call(nc.request(subject, body, timeout=REPLY_TIMEOUT))
        headers = msg.headers or {}
        if ERROR_CODE_HEADER in headers:
            return headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "")
        json.loads(msg.data)  # a success is a JSON answer
        return "", ""

    def check(self, subject: str, body: bytes, *, admin: bool = False) -> None:
        code, message = self.request(subject, body, admin=admin)
        assert code == "" or code in ALLOWED, f"{subject} answered {code}: {message[:500]}"
        assert len(message) <= api.MAX_ERROR_MESSAGE + 40  # quoted values are cut


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    loop = Loop()
    tmp = tmp_path_factory.mktemp("fuzz")
    stack = Stack(data_dir=tmp / "stack", workers=["worker-1"], devices="2x16GiB")
    script = tmp / "main.py"
    script.write_text("print('ok')\n")

    async def start() -> Fuzz:
        await stack.start()
        client = await AsyncClient(profile=stack.profile(USER)).connect()
        found = Fuzz(loop, stack, client, await stack.connect())
        found.code_refs = [
            await client.upload(package_function(one)),
            await client.upload(package_script(script)),
        ]
        job = await client.submit_call(one, gpu=0.1, duration=600)
        found.job_ids.append(job.job_id)
        await client.set_secret("FUZZ_TOKEN", "t")
        return found

    async def stop(found: Fuzz) -> None:
        await found.client.close()
        await found.admin.close()

    try:
        found = loop.call(start())
        try:
            yield found
        finally:
            loop.call(stop(found))
    finally:
        stack.stop()
        loop.close()


# -- what a caller may send ---------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "x" * 100_000,
    "\x01" * 20_000,
    '"' * 20_000,
    "é" * 20_000,
    "\ud800",
    "a\udc00b",
    "\U0001f600",
    "\x00",
    "\r\nNats-Service-Error-Code: OK\r\n\r\n",
    "../../etc/passwd",
    "*",
    ">",
    "a.b",
    "a b",
    "jobs.>",
    "_INBOX.user.fuzz.x",
    "1e999999",
    "NaN",
    "-1",
    "0" * 64,
]
"""Strings that have broken parsers, subjects, headers and encoders elsewhere."""

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.sampled_from(NASTY),
)
# Two levels of lists and objects; deeper nesting comes from `bodies` (up to 60,000 deep).
shallow = st.one_of(
    scalars,
    st.lists(scalars, max_size=4),
    st.dictionaries(st.text(max_size=10), scalars, max_size=3),
)
json_values = st.one_of(
    shallow,
    st.lists(shallow, max_size=3),
    st.dictionaries(st.text(max_size=10), shallow, max_size=3),
)
TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
tokens = st.text(TOKEN, min_size=1, max_size=64)
env_names = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20)


def plausible(fuzz: Fuzz) -> dict[str, st.SearchStrategy[Any]]:
    """Values that get past an operation's first checks, so the fuzzer reaches further."""
    nasty = st.sampled_from(NASTY)
    refs = st.sampled_from(fuzz.code_refs)
    jobs = st.sampled_from(fuzz.job_ids)
    statuses = st.sampled_from(
        ["SUBMITTED", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "running", "nope"]
    )
    return {
        "code_ref": refs | tokens | nasty,
        "gpu": st.sampled_from([0.1, 0.5, 1, 2, 8, "0.3", 0.15, 10**30]),
        "duration": st.sampled_from([60, 600, 86400, "600", 59, 10**30]),
        "user": st.sampled_from([USER, "", "someone-else"]) | nasty,
        "job_id": jobs | tokens | nasty,
        "entrypoint": st.sampled_from(["function", "main.py", "x" * 2000]) | nasty,
        "requirements": st.lists(
            st.sampled_from(["tinystats", "numpy>=1.26", "-r /etc/shadow", "a @ http://x"]) | nasty,
            max_size=3,
        ),
        "priority": st.integers(min_value=-200, max_value=200),
        "env": st.dictionaries(env_names | nasty, st.text(max_size=20) | nasty, max_size=3),
        "network": st.booleans(),
        "secrets": st.lists(
            st.sampled_from(["FUZZ_TOKEN", "MISSING", "lower", "PATH"]) | nasty, max_size=3
        ),
        "status": st.lists(statuses | nasty, max_size=3),
        "limit": st.integers(min_value=-5, max_value=10**12),
        "deliver": st.sampled_from(
            ["_INBOX.user.fuzz.abc", "_INBOX.user.other.abc", "_INBOX.observer.o.x", "jobs.x"]
        )
        | (tokens | nasty).map(lambda t: f"_INBOX.user.{USER}.{t}"),
        "from_seq": st.integers(min_value=-5, max_value=2**64 + 5),
        "logs": st.booleans(),
        "from_log_seq": st.integers(min_value=-5, max_value=2**64 + 5),
        "log_deliver": st.sampled_from(
            ["", "_INBOX.user.fuzz.abc.LOGS", "_INBOX.user.other.x", "logs.x"]
        )
        | (tokens | nasty).map(lambda t: f"_INBOX.user.{USER}.{t}"),
        "filter": st.sampled_from(
            ["", "jobs.fuzz.>", "jobs.fuzz.*.*.*", "jobs.>", "jobs.other.>", "jobs.fuzz.a b"]
            + ["logs.fuzz.>", "results.fuzz.>", "logs.>"]
        )
        | nasty.map(lambda t: f"jobs.{USER}.{t}"),
        "size": st.integers(min_value=-5, max_value=10**12),
        "offset": st.integers(min_value=-5, max_value=10**12),
        "data": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
        "name": st.sampled_from(["FUZZ_TOKEN", "NEW_ONE", "lower", "PATH", "CUMULUS_X"]) | nasty,
        "value": st.text(max_size=40) | nasty,
    }


FIELDS = {
    "submit": [
        "code_ref",
        "gpu",
        "duration",
        "user",
        "job_id",
        "entrypoint",
        "requirements",
        "priority",
        "env",
        "network",
        "secrets",
    ],
    "status": ["job_id", "user"],
    "cancel": ["job_id", "user"],
    "jobs": ["user", "status", "limit"],
    "workers": [],
    "health": [],
    "watch": ["job_id", "deliver", "from_seq", "filter", "logs", "from_log_seq", "log_deliver"],
    "upload": ["code_ref", "size", "offset", "data"],
    "secret_put": ["name", "value"],
    "secret_list": [],
    "secret_delete": ["name"],
}
"""Every operation of `cumulus.api.<user>.<op>` (services/gateway/app.py) and its fields."""


def bodies(fuzz: Fuzz, fields: list[str]) -> st.SearchStrategy[bytes]:
    """Request bodies: the fields, each plausible or anything, extra fields, any JSON at all,
    JSON nested deeper than any parser's stack, or bytes that are no JSON."""
    good = plausible(fuzz)
    # Mostly plausible values, so that one odd field meets code past the others' checks.
    value = {name: st.one_of(good[name], good[name], good[name], json_values) for name in fields}
    extra = st.dictionaries(st.text(max_size=12), json_values, max_size=2)
    whole = st.fixed_dictionaries(value)
    some = st.fixed_dictionaries({}, optional=value)
    shaped = st.tuples(st.one_of(whole, whole, some), extra).map(lambda t: {**t[1], **t[0]})
    as_json = (shaped | json_values).map(lambda b: json.dumps(b).encode())
    deep = st.tuples(st.sampled_from(fields or ["x"]), st.integers(1, 60_000)).map(
        lambda fd: f'{{"{fd[0]}": {"[" * fd[1]}{"]" * fd[1]}}}'.encode()
    )
    return st.one_of(as_json, as_json, as_json, deep, st.binary(max_size=256))


@pytest.mark.parametrize("op", [op for op, fields in FIELDS.items() if fields])
@FUZZ
@given(data=st.data())
def test_every_operation_answers_every_body_with_a_seed_code(
    fuzz: Fuzz, op: str, data: st.DataObject
) -> None:
    body = data.draw(bodies(fuzz, FIELDS[op]), label="body")
    fuzz.check(subjects.api(op, USER), body)


@pytest.mark.parametrize("op", [op for op, fields in FIELDS.items() if not fields])
@settings(FUZZ, max_examples=EXAMPLES // 4)
@given(data=st.data())
def test_operations_without_fields_answer_every_body(
    fuzz: Fuzz, op: str, data: st.DataObject
) -> None:
    """workers, health and secret_list read nothing from the body: fewer examples."""
    body = data.draw(bodies(fuzz, []), label="body")
    fuzz.check(subjects.api(op, USER), body)


@FUZZ
@given(data=st.data())
def test_the_observers_and_workers_operations_answer_every_body(
    fuzz: Fuzz, data: st.DataObject
) -> None:
    subject, fields = data.draw(
        st.sampled_from(
            [
                (f"{subjects.OBSERVE_PREFIX}.watch", FIELDS["watch"]),
                (subjects.secrets_request("worker-1"), ["job_id"]),
            ]
        ),
        label="operation",
    )
    fuzz.check(subject, data.draw(bodies(fuzz, fields), label="body"), admin=True)


@FUZZ
@given(
    user=st.text(
        st.characters(blacklist_categories=["Cs", "Zs", "Cc"], blacklist_characters=".*>"),
        min_size=1,
        max_size=100,
    ),
    op=st.sampled_from(list(FIELDS)),
)
def test_a_user_token_no_identity_can_have_is_refused(fuzz: Fuzz, user: str, op: str) -> None:
    """Only the operator may publish under another user's subject; what it names there is no
    user at all unless it is a valid subject token."""
    code, message = fuzz.request(subjects.api(op, user), b"{}", admin=True)
    if not subjects.valid_token(user):
        assert code == "INVALID_ARGUMENT", message
    else:
        assert code == "" or code in ALLOWED, message


# -- what the fuzzer found (each fixed in the gateway; kept as plain regressions) ----------------


@pytest.mark.parametrize(
    ("op", "body"),
    [
        # A lone surrogate passed decoding and failed every encoder after it (the event, the
        # reply's headers): INTERNAL, or no reply at all.
        ("status", b'{"job_id": "\\ud800"}'),
        ("submit", b'{"code_ref": "x", "entrypoint": "\\udc00"}'),
        ("secret_put", b'{"name": "\\ud800", "value": "v"}'),
        # An error quoting a 600 KB value made the reply larger than the bus carries: no reply.
        ("status", json.dumps({"job_id": "x" * 600_000}).encode()),
        ("secret_delete", json.dumps({"name": "x" * 600_000}).encode()),
        ("submit", json.dumps({"code_ref": "x", "env": {"!" * 600_000: "v"}}).encode()),
        # A watch the server refused (a bad subject: INTERNAL) or a start past any sequence
        # (now clamped: the watch starts at the end).
        ("watch", b'{"deliver": "_INBOX.user.fuzz.x", "filter": "jobs.fuzz.a b"}'),
        ("watch", b'{"deliver": "_INBOX.user.fuzz.a b", "job_id": "j1"}'),
        (
            "watch",
            b'{"deliver": "_INBOX.user.fuzz.x", "job_id": "JOB", "from_seq": 18446744073709551615}',
        ),
        (
            "watch",
            b'{"deliver": "_INBOX.user.fuzz.x", "job_id": "JOB", "logs": true, '
            b'"from_log_seq": 18446744073709551615}',
        ),
        # A status filter no job can have, a limit past any list.
        ("jobs", b'{"status": ["nope"], "limit": 1000000000000}'),
    ],
)
def test_bodies_that_broke_the_gateway_get_a_seed_code(fuzz: Fuzz, op: str, body: bytes) -> None:
    body = body.replace(b'"JOB"', json.dumps(fuzz.job_ids[0]).encode())  # a job that exists
    code, message = fuzz.request(subjects.api(op, USER), body)
    assert code in ALLOWED or (op == "watch" and code == ""), f"{op} answered {code}: {message}"
    assert len(message) <= api.MAX_ERROR_MESSAGE + 40


def test_after_the_fuzzing_the_services_keep_serving(fuzz: Fuzz) -> None:
    async def normal_job() -> Any:
        health = await fuzz.client.health()
        value = await fuzz.client.run(one, gpu=0.1, duration=600, logs=None, timeout=60)
        return health, value

    health, value = fuzz.loop.call(normal_job())
    assert health.status == "SERVING"
    assert value == 1
    for name, proc in fuzz.stack.procs.items():
        assert proc.alive(), f"{name} died"


def test_a_list_of_jobs_stops_where_the_bus_would() -> None:
    """Four jobs with a 256 KiB result each once made a `jobs` reply too large to send: the
    caller got no answer at all."""
    result = msgspec.Raw(json.dumps({"encoding": "json", "data": "r" * 256 * 1024}).encode())
    jobs = [JobInfo(job_id=f"j{i}", user=USER, result=result) for i in range(6)]
    reply = gateway_app._fitting(jobs, 1024 * 1024 - api.REPLY_HEADROOM)
    assert reply["truncated"] is True
    assert 1 <= len(reply["jobs"]) < 6
    assert len(msgspec.json.encode(reply)) <= 1024 * 1024 - api.REPLY_HEADROOM
    assert "truncated" not in gateway_app._fitting(jobs[:1], 1024 * 1024)
