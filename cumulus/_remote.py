"""`@remote`: a function that still runs here when called, and on a GPU share with `.remote()`.

    @cumulus.remote(gpu=0.5, duration=600, requirements=["numpy"])
    def train(lr: float) -> float: ...

    train(0.1)                      # here, as before
    train.remote(0.1)               # on the cluster: prints its logs, returns its value
    job = train.submit(0.1)         # on the cluster, detached: a Job handle
    train.map([0.1, 0.2, 0.3])      # one job per input, results in input order
    train.options(gpu=1).remote(0.1)

Calls go through the default client (`connect()`, else one made from $CUMULUS_NATS_URL on
first use); options and arguments never mix, so the function may have any parameter names.
"""

from __future__ import annotations

import atexit
import copy
import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, ParamSpec, TypeVar, Unpack, overload

from cumulus._client import AsyncClient, Client
from cumulus._jobs import Job, Logs
from cumulus._options import JobOptionArgs, JobOptions
from cumulus._retry import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")

_KEEP: Any = object()
"""`options()`'s default: keep what the function had."""

_default: Client | None = None
_default_lock = threading.Lock()


def connect(
    nats_url: str | None = None,
    user: str | None = None,
    *,
    profile: str | None = None,
    retry: RetryPolicy | None = None,
) -> Client:
    """Connect the default client that `@remote` functions use (closing any previous one)."""
    global _default
    client = Client(nats_url, user, profile=profile, retry=retry)
    with _default_lock:
        previous, _default = _default, client
    if previous is not None:
        previous.close()
    return client


def default_client() -> Client:
    """The default client, connected on first use with the default profile (or
    $CUMULUS_PROFILE, $CUMULUS_NATS_URL)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


@dataclass(frozen=True)
class RemoteOptions:
    """What a remote call asks for: the job's options and how `.remote()` waits for it."""

    job: JobOptions = field(default_factory=JobOptions)
    timeout: float | None = None
    """Client-side bound on waiting for `.remote()` (TimeoutError); the job is not cut short."""
    logs: Logs = True
    """Where `.remote()` prints the job's output (see Client.run)."""

    def __str__(self) -> str:
        return f"{self.job}"


class RemoteFunction(Generic[P, R]):
    """A function with a cluster side. Calling it runs it here; see the module docstring."""

    def __init__(
        self, func: Callable[P, R], options: RemoteOptions, client: Client | None = None
    ) -> None:
        self.__cumulus_function__ = func
        self.func = func
        self.opts = options
        self._client = client
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", self.func)
        return f"<remote function {name!r} {self.opts.job}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # In a job it is just the function: the job needs neither the SDK nor a client.
        return (copy.copy, (self.func,))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    @property
    def client(self) -> Client:
        return self._client or default_client()

    def options(
        self,
        *,
        client: Client | None = None,
        timeout: float | None = _KEEP,
        logs: Logs = _KEEP,
        **changes: Unpack[JobOptionArgs],
    ) -> RemoteFunction[P, R]:
        """The same function with some options changed: `f.options(gpu=1).remote(x)`."""
        opts = replace(
            self.opts,
            job=JobOptions.build(self.opts.job, **changes),
            timeout=self.opts.timeout if timeout is _KEEP else timeout,
            logs=self.opts.logs if logs is _KEEP else logs,
        )
        return RemoteFunction(self.func, opts, client or self._client)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on the cluster, print the job's output, return its value (Ctrl-C cancels)."""
        value: R = self.client.run_call(
            self.func, args, kwargs, self.opts.job, logs=self.opts.logs, timeout=self.opts.timeout
        )
        return value

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Start on the cluster and return the job's handle at once."""
        return self.client.submit_call(self.func, args, kwargs, self.opts.job)

    def map(
        self,
        *iterables: Iterable[Any],
        concurrency: int = 16,
        return_exceptions: bool = False,
        warm: int | bool = False,
        retries: int = 0,
        ordered: bool = True,
    ) -> list[R]:
        """Results in input order (`zip(*iterables)`). With `warm` (processes, or True): one
        job whose warm processes call the function on input after input (docs/map.md);
        without: one job per input, at most `concurrency` at once."""
        values: list[R] = self.client.map(
            self.func,
            *iterables,
            options=self.opts.job,
            concurrency=concurrency,
            return_exceptions=return_exceptions,
            timeout=self.opts.timeout,
            warm=warm,
            retries=retries,
            ordered=ordered,
        )
        return values

    async def remote_async(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """`.remote()` for asyncio code, over a connection of its own to the default URL."""
        known = self._client.aio if self._client is not None else None
        url = known.nats_url if known is not None else None
        profile = known.profile if known is not None else None
        async with AsyncClient(url, profile=profile) as client:
            value: R = await client.run_call(
                self.func,
                args,
                kwargs,
                self.opts.job,
                logs=self.opts.logs,
                timeout=self.opts.timeout,
            )
            return value


@overload
def remote(func: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(
    *,
    options: JobOptions | None = None,
    timeout: float | None = None,
    logs: Logs = True,
    client: Client | None = None,
    **job_options: Unpack[JobOptionArgs],
) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(
    func: Callable[P, R] | None = None,
    /,
    *,
    options: JobOptions | None = None,
    timeout: float | None = None,
    logs: Logs = True,
    client: Client | None = None,
    **job_options: Unpack[JobOptionArgs],
) -> RemoteFunction[P, R] | Callable[[Callable[P, R]], RemoteFunction[P, R]]:
    """Give a function a cluster side: `f.remote(x)` runs it on `gpu` of a GPU for at most
    `duration` seconds with `requirements` installed (the JobOptions keywords, or one
    `options=JobOptions(...)`); `f(x)` still runs it here."""
    opts = RemoteOptions(JobOptions.build(options, **job_options), timeout, logs)

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        return RemoteFunction(f, opts, client)

    return wrap(func) if func is not None else wrap
