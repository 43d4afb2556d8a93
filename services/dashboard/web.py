"""The dashboard's HTTP side: a small asyncio server, read only, one request per connection.

Routes (every one needs the token, from `?token=` or the cookie it sets):

    GET /                        the page (static/index.html)
    GET /static/app.js|style.css its script and style
    GET /api/state               the snapshots as one JSON object
    GET /api/events              Server-Sent Events: `jobs`, `workers`, `status` snapshots
    GET /api/jobs/<id>/events    Server-Sent Events: the job's `event`s and `log`s, then `end`

The page acts as the user whose profile the dashboard holds, so the token keeps other local
users and other sites' pages out: it is compared in constant time, sent back only as an
HttpOnly, SameSite=Strict cookie, and the URL with it is not passed on (no-referrer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import logging
from collections.abc import AsyncGenerator
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from services.dashboard.board import Board, job_stream
from shared import subjects
from shared.errors import CumulusError

log = logging.getLogger("cumulus.dashboard")

HEAD_TIMEOUT_S = 10.0
"""How long a connection may take to send its request line and headers."""
KEEPALIVE_S = 15.0
"""A comment line on an idle event stream this often, so a closed page is noticed."""
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = (
    "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'\r\n"
    "X-Content-Type-Options: nosniff\r\n"
    "Referrer-Policy: no-referrer\r\n"
    "Cache-Control: no-store\r\n"
)
REASONS = {200: "OK", 303: "See Other", 403: "Forbidden", 404: "Not Found", 405: "Not Allowed"}


class Request(msgspec.Struct):
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class Web:
    """Serves the page and its streams for one board, to holders of `token`."""

    def __init__(self, board: Board, token: str, cookie: str) -> None:
        self.board = board
        self.token = token
        self.cookie = cookie
        """The cookie's name (per port: two dashboards on one host keep their own)."""
        self.streams: set[asyncio.Task[Any]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: read the request, answer it, close."""
        try:
            request = await asyncio.wait_for(_read_request(reader), HEAD_TIMEOUT_S)
            if request is not None:
                await self._answer(request, reader, writer)
        except (
            ConnectionError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _allowed(self, request: Request) -> tuple[bool, bool]:
        """(the token is right, it came in the query: set the cookie)."""
        given = request.query.get("token", [""])[0]
        if given:
            return hmac.compare_digest(given.encode(), self.token.encode()), True
        try:
            jar = SimpleCookie(request.headers.get("cookie", ""))
        except CookieError:
            return False, False
        morsel = jar.get(self.cookie)
        ok = morsel is not None and hmac.compare_digest(morsel.value.encode(), self.token.encode())
        return ok, False

    async def _answer(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if request.method != "GET":
            await _send(writer, 405, "text/plain", b"read only\n")
            return
        ok, from_query = self._allowed(request)
        if not ok:
            text = b"open the URL `cumulus dashboard` (or `cumulus up`) printed, with its token\n"
            await _send(writer, 403, "text/plain", text)
            return
        cookie = (
            f"Set-Cookie: {self.cookie}={self.token}; HttpOnly; SameSite=Strict; Path=/\r\n"
            if from_query
            else ""
        )
        if request.path == "/" and from_query:
            # the token leaves the address bar (and the history); the cookie carries it on
            await _send(writer, 303, "text/plain", b"", cookie + "Location: /\r\n")
        elif request.path in STATIC:
            name, kind = STATIC[request.path]
            body = importlib.resources.files(__package__).joinpath("static", name).read_bytes()
            await _send(writer, 200, kind, body, cookie)
        elif request.path == "/api/state":
            body = msgspec.json.encode({k: msgspec.Raw(v) for k, v in self.board.snapshots.items()})
            await _send(writer, 200, "application/json", body, cookie)
        elif request.path == "/api/events":
            await self._stream(reader, writer, self._snapshots())
        elif (job_id := _job_path(request.path)) is not None:
            await self._stream(reader, writer, self._job(job_id))
        else:
            await _send(writer, 404, "text/plain", b"not found\n")

    async def _snapshots(self) -> AsyncGenerator[tuple[str, bytes], None]:
        page = self.board.open_page()
        try:
            while True:
                arrived = await page.take(KEEPALIVE_S)
                if not arrived:
                    yield "", b""
                for kind, data in arrived.items():
                    yield kind, data
        finally:
            self.board.close_page(page)

    async def _job(self, job_id: str) -> AsyncGenerator[tuple[str, bytes], None]:
        try:
            async with contextlib.aclosing(job_stream(self.board.client, job_id)) as items:
                async for item in items:
                    yield item["kind"], msgspec.json.encode(item)
        except CumulusError as exc:
            yield "problem", msgspec.json.encode({"code": exc.code, "message": exc.message})
        yield "end", b"{}"

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        items: AsyncGenerator[tuple[str, bytes], None],
    ) -> None:
        """Server-Sent Events until the items end or the page goes away."""
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
        writer.write((head + SECURITY_HEADERS + "\r\n").encode())
        sending = asyncio.create_task(_send_events(writer, items))
        closed = asyncio.create_task(reader.read(1))  # b"" once the page closes the connection
        self.streams.add(sending)
        try:
            await asyncio.wait({sending, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.streams.discard(sending)
            for task in (sending, closed):
                task.cancel()
            await asyncio.gather(sending, closed, return_exceptions=True)


async def _send_events(
    writer: asyncio.StreamWriter, items: AsyncGenerator[tuple[str, bytes], None]
) -> None:
    async with contextlib.aclosing(items) as events:
        async for kind, data in events:
            # JSON has no raw newlines, so one `data:` line carries it whole
            writer.write(f"event: {kind}\ndata: ".encode() + data + b"\n\n" if kind else b":\n\n")
            await writer.drain()


def _job_path(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 5 and parts[:3] == ["", "api", "jobs"] and parts[4] == "events":
        return parts[3] if subjects.valid_token(parts[3]) else None
    return None


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(parts[1])
    return Request(parts[0], url.path, parse_qs(url.query), headers)


async def _send(
    writer: asyncio.StreamWriter, status: int, kind: str, body: bytes, extra: str = ""
) -> None:
    head = (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}{SECURITY_HEADERS}\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
