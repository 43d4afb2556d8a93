"""What a job handle needs of its client: a leaf module, so `_jobs` and `_client` do not import
each other (the client makes handles; a handle only calls back through this)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nats.aio.client import Client as NatsClient

if TYPE_CHECKING:
    from cumulus._jobs import Feed

T = TypeVar("T")


class Transport(Protocol):
    """The client as a job handle sees it: the user, the connection, one API call, and the
    feed of its user's job events (cumulus/_jobs.py `Feed`; None until its first submit)."""

    user: str
    _feed: Feed | None

    @property
    def nc(self) -> NatsClient: ...

    async def _call(self, op: str, body: Any, reply_type: type[T]) -> T: ...
