"""The dashboard's wiring: connect as the user, start the board and the HTTP server, stop.

`cumulus dashboard` runs one until Ctrl-C; `cumulus up` runs one beside the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
from dataclasses import dataclass, field

from cumulus import AsyncClient
from services.dashboard.board import Board
from services.dashboard.web import Web

DEFAULT_PORT = 8765
"""The port `cumulus up` and `cumulus dashboard` use unless told otherwise (`dashboard.port`)."""


@dataclass
class Dashboard:
    """A running dashboard: `url` (with its token) is what the user opens."""

    profile: str | None = None
    nats_url: str | None = None
    user: str | None = None
    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    """0: any free port."""
    fallback: bool = False
    """When `port` is taken, take a free one instead of failing (`cumulus up`)."""
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    client: AsyncClient | None = field(default=None, init=False)
    board: Board | None = field(default=None, init=False)
    server: asyncio.Server | None = field(default=None, init=False)
    web: Web | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{self.port}/?token={self.token}"

    async def start(self) -> Dashboard:
        """Connect, take the first snapshots, listen. Errors: the client's (UNAVAILABLE,
        UNAUTHENTICATED), or OSError when the port is taken and there is no fallback."""
        self.client = await AsyncClient(self.nats_url, self.user, profile=self.profile).connect()
        try:
            self.board = Board(self.client)
            await self.board.start()
            self.server = await self._listen()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _listen(self) -> asyncio.Server:
        assert self.board is not None
        try:
            server = await self._serve(self.port)
        except OSError as exc:
            if not self.fallback or exc.errno != errno.EADDRINUSE:
                raise
            server = await self._serve(0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _serve(self, port: int) -> asyncio.Server:
        assert self.board is not None
        self.web = Web(self.board, self.token, cookie="")
        server = await asyncio.start_server(self.web.handle, self.bind, port)
        self.web.cookie = f"cumulus_dashboard_{server.sockets[0].getsockname()[1]}"
        return server

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.web is not None:
            for task in list(self.web.streams):
                task.cancel()
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 5.0)
            self.server = None
        if self.board is not None:
            await self.board.stop()
            self.board = None
        if self.client is not None:
            await self.client.close()
            self.client = None
