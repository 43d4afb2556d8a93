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
from typing import Any, TypeVar

import msgspec
import nats.errors
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
)

log = logging.getLogger(__name__)


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
    here so that validation, not the parser, names the bad value."""
    try:
        return msgspec.json.decode(data or b"{}", type=typ)
    except RecursionError:
        raise InvalidArgument("Malformed request: nested too deeply") from None
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"Malformed request: {exc}") from None
    except msgspec.DecodeError as exc:
        try:
            loose = json.loads(data)
        except (ValueError, RecursionError):
            raise InvalidArgument(f"Malformed request: {exc}") from None
        try:
            return msgspec.convert(loose, type=typ)
        except msgspec.ValidationError as exc2:
            raise InvalidArgument(f"Malformed request: {exc2}") from None


MAX_CONCURRENT_REQUESTS = 256
"""Requests one endpoint serves at once; more wait for a slot (NATS keeps them meanwhile)."""


def endpoint(handler: Callable[[bytes], Awaitable[Any]]) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation that takes the request body (see `_dispatcher`)."""
    return _dispatcher(lambda req: handler(req.data))


def user_endpoint(
    handler: Callable[[str, bytes], Awaitable[Any]],
) -> Callable[[Request], Awaitable[None]]:
    """Wrap an operation of `cumulus.api.<user>.<op>`: it gets the user the subject names
    (which NATS permissions tie to the caller's identity) and the body."""
    return _dispatcher(lambda req: handler(subjects.api_user(req.subject), req.data))


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
        except CumulusError as exc:
            await req.respond_error(exc.code, exc.message, _json.encode({"error": exc.to_dict()}))
            return
        except Exception as exc:
            log.exception("request failed", extra={"fields": {"subject": req.subject}})
            err = Internal(f"internal error: {exc}")
            await req.respond_error(err.code, err.message)
            return
        body = reply if isinstance(reply, bytes | msgspec.Raw) else _json.encode(reply)
        await req.respond(bytes(body))

    return dispatch
