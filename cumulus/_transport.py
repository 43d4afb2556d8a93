"""What a job handle needs of its client: a leaf module, so `_jobs` and `_client` do not import
each other (the client makes handles; a handle only calls back through this)."""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from nats.js import JetStreamContext

T = TypeVar("T")


class Transport(Protocol):
    """The client as a job handle sees it: the user, the bus, and one API call."""

    user: str

    def _jetstream(self) -> JetStreamContext: ...

    async def _call(self, op: str, body: dict[str, Any], reply_type: type[T]) -> T: ...
