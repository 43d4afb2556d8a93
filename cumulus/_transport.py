"""What a job handle needs of its client: a leaf module, so `_jobs` and `_client` do not import
each other (the client makes handles; a handle only calls back through this)."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from nats.aio.client import Client as NatsClient

T = TypeVar("T")


class Transport(Protocol):
    """The client as a job handle sees it: the user, the connection, and one API call."""

    user: str

    @property
    def nc(self) -> NatsClient: ...

    async def _call(self, op: str, body: Any, reply_type: type[T]) -> T: ...
