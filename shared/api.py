"""Request and reply bodies of the gateway's NATS micro service, and the one client call.

Operations (subject `cumulus.api.<op>`): submit, status, cancel, jobs, workers, health — the
seed's SubmitJob, GetJobStatus, CancelJob, ListWorkers, HealthCheck, plus ListJobs. Errors come
back in the micro headers and are rebuilt as typed errors by `request()`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.micro.request import Request

from shared import subjects
from shared.errors import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    ApiUnreachable,
    CumulusError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    shown,
)
from shared.events import MapSpec

log = logging.getLogger(__name__)

BUS_AWAY = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
"""What a handler's own bus call raises while JetStream cannot answer: UNAVAILABLE (retried)."""


class SubmitRequest(msgspec.Struct, kw_only=True):
    code_ref: str
    gpu: Any = 0.5
    """0.1-0.9 or a whole number 1-8, as a number or a string."""
    duration: Any = 3600
    """Seconds, 60-86400."""
    user: str = ""
    """Deprecated: the user is the caller's identity (the request's subject); a request
    naming another user is PERMISSION_DENIED."""
    job_id: str = ""
    """Optional, chosen by the client so a retried submit is not a second job."""
    entrypoint: str = "function"
    requirements: list[str] = []
    priority: int = 0
    env: dict[str, str] = {}
    network: bool = False
    """The job asks for network access; the user's policy must allow it (policy.network)."""
    secrets: list[str] = []
    """Names of the caller's secrets (`secret_put`) the job gets as environment variables."""
    map: MapSpec | None = None
    """A warm map (docs/map.md): the job serves `map.inputs` inputs from its queue."""
    traceparent: str = ""
    """The caller's W3C trace context: the job's trace continues it (shared/tracing.py)."""
    name: str = ""
    """The job's name (shared/labels.py); "" for none."""
    tags: dict[str, str] = {}
    """The job's tags, key -> value (shared/labels.py)."""
    target: str = ""
    """What the job runs, as the client names it (`train.py`, `pkg.mod:fit`): shown in lists."""
    volumes: dict[str, str] = {}
    """Folders the operator offers to mount, {name: where in the container} (shared/volumes.py)."""
    retries: int = 0
    """Times the job is run again when its code fails (0-10; shared.events.retry_backoff)."""
    image: str = ""
    """The job's own image, built FROM the job image (shared/images.py); "": the default."""


class SubmitReply(msgspec.Struct, kw_only=True):
    job_id: str
    status: str


class JobRef(msgspec.Struct, kw_only=True):
    job_id: str
    user: str = ""


class ListJobsRequest(msgspec.Struct, kw_only=True):
    user: str = ""
    status: list[str] = []
    limit: int = 100
    name: str = ""
    """Only jobs with this name, or whose name matches this shell pattern (`train-*`)."""
    tags: dict[str, str | None] = {}
    """Only jobs with every one of these tags (a None value: the key with any value)."""
    since_s: float = 0.0
    """Only jobs submitted within this many seconds (0: any age)."""
    users: list[str] = []
    """`cumulus.observe.jobs` only (observers and operators): these users' jobs ([]: all)."""


class SecretPut(msgspec.Struct, kw_only=True):
    """`secret_put`: store (or replace) one of the caller's secrets."""

    name: str
    value: str


class SecretRef(msgspec.Struct, kw_only=True):
    """`secret_delete`: one of the caller's secrets, by name."""

    name: str


class SecretNames(msgspec.Struct, kw_only=True):
    """`secret_list`'s reply: the caller's secrets' names (never their values)."""

    names: list[str] = []


class SecretsRequest(msgspec.Struct, kw_only=True):
    """A worker's `cumulus.secrets.<worker>.get`: the secrets of a job placed on it."""

    job_id: str


class SecretsReply(msgspec.Struct, kw_only=True):
    secrets: dict[str, str] = {}


class WorkersQuery(msgspec.Struct, kw_only=True):
    """A page of the `workers` operation: the workers after `after` (by id), at most `limit`
    (0: as many as one reply carries). A fleet of a thousand workers does not fit one reply."""

    after: str = ""
    limit: Annotated[int, msgspec.Meta(ge=0)] = 0


class SchedulerQuery(msgspec.Struct, kw_only=True):
    """Admission check the gateway asks the scheduler before accepting a job."""

    gpu_tenths: int


T = TypeVar("T")

_json = msgspec.json.Encoder()


async def request(
    nc: Client,
    op: str,
    body: Any,
    reply_type: type[T],
    timeout: float = 5.0,
    user: str = "default",
) -> T:
    """Call one API operation as `user` (`cumulus.api.<user>.<op>`; an `op` with a dot is a
    whole subject); a micro error header becomes the matching CumulusError."""
    subject = op if "." in op else subjects.api(op, user)
    try:
        msg = await nc.request(subject, _json.encode(body), timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise ApiUnreachable(
            f"Cumulus API {subject} did not answer; is the gateway running (`cumulus up`)?",
            subject=subject,
        ) from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        raise CumulusError.from_code(
            headers[ERROR_CODE_HEADER],
            headers.get(ERROR_HEADER, "unknown error"),
            _error_details(msg.data),
        )
    return msgspec.json.decode(msg.data, type=reply_type)


def _error_details(data: bytes) -> dict[str, Any] | None:
    """The declared attributes an error reply carries in its body (`to_dict()`), if any."""
    try:
        body = msgspec.json.decode(data) if data else None
    except msgspec.DecodeError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return details if isinstance(details, dict) else None


def decode_request(data: bytes, typ: type[Any]) -> Any:
    """Decode a request body; NaN and Infinity (which Python's json writes) are accepted
    here so that validation, not the parser, names the bad value. A string holding a lone
    UTF-16 surrogate (`"\\ud800"`, which JSON's escapes allow) is refused: it is not text,
    and no event, log line or reply could carry it."""
    try:
        value = _decode(data, typ)
        _json.encode(value)
    except RecursionError:
        raise InvalidArgument("Malformed request: nested too deeply") from None
    except UnicodeError:
        raise InvalidArgument(
            "Malformed request: a string holds a lone UTF-16 surrogate (an unpaired \\ud800-"
            "\\udfff escape), which is not text"
        ) from None
    return value


def _decode(data: bytes, typ: type[Any]) -> Any:
    try:
        return msgspec.json.decode(data or b"{}", type=typ)
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"Malformed request: {exc}") from None
    except msgspec.DecodeError as exc:
        try:
            loose = json.loads(data)
        except ValueError:  # not JSON, or not UTF-8
            raise InvalidArgument(f"Malformed request: {exc}") from None
        try:
            return msgspec.convert(loose, type=typ)
        except msgspec.ValidationError as exc2:
            raise InvalidArgument(f"Malformed request: {exc2}") from None


MAX_CONCURRENT_REQUESTS = 256
"""Requests one endpoint serves at once; more wait for a slot (NATS keeps them meanwhile)."""
REPLY_HEADROOM = 4 * 1024
"""Bytes of the bus's max_payload a reply leaves for its headers (which count against it)."""
MAX_ERROR_MESSAGE = 1000
"""Characters of an error message (and of each string detail) on the wire; a longer one,
which quotes what the caller sent, is cut and says its length."""

_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {ord(c): " " for c in "\t\n\r"}


def wire_text(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """`text` as an error header may carry it: one line (a line break becomes a space, another
    control character its escape, a lone surrogate too), at most `limit` characters (and the
    length if it was cut)."""
    clean = text.translate(_CONTROL).encode("utf-8", "backslashreplace").decode("utf-8")
    return shown(clean, limit)


def reply_budget(nc: Client) -> int:
    """The largest reply body the bus carries to the caller, headers aside."""
    return int(nc.max_payload) - REPLY_HEADROOM


def endpoint(handler: Callable[[bytes], Awaitable[Any]]) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation that takes the request body (see `_dispatcher`)."""
    return _dispatcher(lambda req: handler(req.data))


def user_endpoint(
    handler: Callable[[str, bytes], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation of `cumulus.api.<user>.<op>`: it gets the user the subject names
    (which NATS permissions tie to the caller's identity) and the body. A user name that no
    identity can have (only the operator may publish there) is refused: it would become a
    subject token of every event about the job."""

    async def call(req: Request) -> Any:
        user = subjects.api_user(req.subject)
        if not subjects.valid_token(user):
            raise InvalidArgument(
                f"Invalid user {user!r} in {req.subject}: a user name is letters, digits, '-' "
                "and '_', at most 64 characters"
            )
        return await handler(user, req.data)

    return _dispatcher(call)


def worker_endpoint(
    handler: Callable[[str, bytes], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation of `cumulus.<secrets|consumers>.<worker>.<op>`: it gets the worker
    the subject names (NATS permissions let a worker publish only its own) and the body."""
    return _dispatcher(lambda req: handler(req.subject.split(".")[2], req.data))


def _dispatcher(
    handler: Callable[[Request], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation: JSON reply on success, the seed's code and message on error.

    NATS hands a subscription's messages to its callback one at a time; each request is
    served in a task of its own, so one slow request does not hold up the others.
    """
    slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
    running: set[asyncio.Task[None]] = set()

    async def dispatch(req: Request) -> None:
        await slots.acquire()
        task = asyncio.create_task(serve(req))
        running.add(task)

        def done(t: asyncio.Task[None]) -> None:
            running.discard(t)
            slots.release()

        task.add_done_callback(done)

    async def serve(req: Request) -> None:
        try:
            reply = await handler(req)
            body = bytes(reply if isinstance(reply, bytes | msgspec.Raw) else _json.encode(reply))
        except CumulusError as exc:
            await _respond_error(req, exc)
            return
        except BUS_AWAY as exc:
            # JetStream away, or electing a stream leader (a cluster lost a server): not now.
            away = f"The bus did not answer in time ({type(exc).__name__}); retry shortly"
            await _respond_error(req, Unavailable(away))
            return
        except Exception as exc:
            log.exception("request failed", extra={"fields": {"subject": req.subject}})
            await _respond_error(req, Internal(f"internal error: {exc}"))
            return
        budget = reply_budget(req._msg._client)
        if len(body) > budget:
            await _respond_error(
                req,
                ResourceExhausted(
                    f"The reply is {len(body)} bytes, more than the bus carries ({budget}); "
                    "ask for less (e.g. a smaller limit)"
                ),
            )
            return
        await _send(req, req.respond(body))

    return dispatch


async def _respond_error(req: Request, exc: CumulusError) -> None:
    """The seed's code and message in the micro headers, the error's data in the body; both
    bounded, so that quoting what a caller sent can never make the reply too large."""
    error = exc.to_dict()
    error["message"] = message = wire_text(exc.message)
    error["details"] = {
        k: wire_text(v) if isinstance(v, str) else v for k, v in error["details"].items()
    }
    await _send(req, req.respond_error(exc.code, message, _json.encode({"error": error})))


async def _send(req: Request, reply: Awaitable[None]) -> None:
    """Send a reply; one that cannot be sent (the connection is closing) is logged."""
    try:
        await reply
    except (nats.errors.Error, OSError) as exc:
        log.warning(
            "could not reply", extra={"fields": {"subject": req.subject, "error": repr(exc)}}
        )
