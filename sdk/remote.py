"""`@remote`: a function that still runs here when called, and on a GPU share with `.remote()`.

    @remote(gpu=0.5, duration=600, requirements=["numpy"])
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, ParamSpec, TypeVar, overload

from sdk.client import AsyncCumulusClient, CumulusClient
from sdk.jobs import Job, Logs
from sdk.retry import RetryPolicy

P = ParamSpec("P")
R = TypeVar("R")

_default: CumulusClient | None = None
_default_lock = threading.Lock()


def connect(
    nats_url: str | None = None, user: str | None = None, *, retry: RetryPolicy | None = None
) -> CumulusClient:
    """Connect the default client that `@remote` functions use (closing any previous one)."""
    global _default
    client = CumulusClient(nats_url, user, retry=retry)
    with _default_lock:
        previous, _default = _default, client
    if previous is not None:
        previous.close()
    return client


def default_client() -> CumulusClient:
    """The default client, connected from $CUMULUS_NATS_URL on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = CumulusClient()
        return _default


@atexit.register
def _close_default() -> None:
    if _default is not None:
        _default.close()


@dataclass(frozen=True)
class Options:
    """What a remote call asks for; see CumulusClient.run."""

    gpu: float | str = 0.5
    duration: int = 3600
    requirements: Sequence[str] = ()
    priority: int = 0
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    """Client-side bound on waiting for `.remote()` (TimeoutError); the job is not cut short."""
    logs: Logs = True
    """Where `.remote()` prints the job's output (see CumulusClient.run)."""

    def submit_options(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "duration": self.duration,
            "requirements": list(self.requirements),
            "priority": self.priority,
            "env": dict(self.env),
        }


class RemoteFunction(Generic[P, R]):
    """A function with a cluster side. Calling it runs it here; see the module docstring."""

    def __init__(
        self, func: Callable[P, R], options: Options, client: CumulusClient | None = None
    ) -> None:
        self.__cumulus_function__ = func
        self.func = func
        self.opts = options
        self._client = client
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return f"<remote function {getattr(self.func, '__qualname__', self.func)!r} {self.opts}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # In a job it is just the function: the job needs neither the SDK nor a client.
        return (copy.copy, (self.func,))

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    @property
    def client(self) -> CumulusClient:
        return self._client or default_client()

    def options(
        self, *, client: CumulusClient | None = None, **changes: Any
    ) -> RemoteFunction[P, R]:
        """The same function with some options changed: `f.options(gpu=1).remote(x)`."""
        return RemoteFunction(self.func, replace(self.opts, **changes), client or self._client)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run on the cluster, print the job's output, return its value (Ctrl-C cancels)."""
        value: R = self.client.run_call(
            self.func,
            args,
            kwargs,
            logs=self.opts.logs,
            timeout=self.opts.timeout,
            **self.opts.submit_options(),
        )
        return value

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Start on the cluster and return the job's handle at once."""
        return self.client.submit_call(self.func, args, kwargs, **self.opts.submit_options())

    def map(
        self,
        *iterables: Iterable[Any],
        concurrency: int = 16,
        return_exceptions: bool = False,
    ) -> list[R]:
        """One job per input (`zip(*iterables)`), at most `concurrency` at once; results in
        input order."""
        values: list[R] = self.client.map(
            self.func,
            *iterables,
            concurrency=concurrency,
            return_exceptions=return_exceptions,
            timeout=self.opts.timeout,
            **self.opts.submit_options(),
        )
        return values

    async def remote_async(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """`.remote()` for asyncio code, over a connection of its own to the default URL."""
        url = self._client.nats_url if self._client is not None else None
        async with AsyncCumulusClient(url) as client:
            value: R = await client.run_call(
                self.func,
                args,
                kwargs,
                logs=self.opts.logs,
                timeout=self.opts.timeout,
                **self.opts.submit_options(),
            )
            return value


@overload
def remote(func: Callable[P, R], /) -> RemoteFunction[P, R]: ...


@overload
def remote(
    *,
    gpu: float | str = 0.5,
    duration: int = 3600,
    requirements: Sequence[str] = (),
    priority: int = 0,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    logs: Logs = True,
    client: CumulusClient | None = None,
) -> Callable[[Callable[P, R]], RemoteFunction[P, R]]: ...


def remote(
    func: Callable[P, R] | None = None,
    /,
    *,
    gpu: float | str = 0.5,
    duration: int = 3600,
    requirements: Sequence[str] = (),
    priority: int = 0,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    logs: Logs = True,
    client: CumulusClient | None = None,
) -> RemoteFunction[P, R] | Callable[[Callable[P, R]], RemoteFunction[P, R]]:
    """Give a function a cluster side: `f.remote(x)` runs it on `gpu` of a GPU for at most
    `duration` seconds with `requirements` installed; `f(x)` still runs it here."""
    options = Options(
        gpu=gpu,
        duration=duration,
        requirements=tuple(requirements),
        priority=priority,
        env=dict(env or {}),
        timeout=timeout,
        logs=logs,
    )

    def wrap(f: Callable[P, R]) -> RemoteFunction[P, R]:
        return RemoteFunction(f, options, client)

    return wrap(func) if func is not None else wrap
