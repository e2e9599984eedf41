"""A minimal HTTP/1.1 keep-alive client on asyncio protocols: the default transport under the
load generator (``load.py``), which owns the loops and the timing; nothing else uses it.

Each request's bytes (request line, headers and body) are built once per body and target; a
connection sends one request at a time and reads the answer by its ``Content-Length`` (what
uvicorn and nginx send; a chunked answer is an error here). Several times cheaper per request
than aiohttp, so that one core of load generator outruns a Python server on the other core.
"""

from __future__ import annotations

import asyncio

from .payloads import Body


class HTTPError(Exception):
    """The connection broke or the answer could not be read."""


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HTTPError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            status = self._answer()
        except (ValueError, IndexError) as error:
            self.waiter.set_exception(HTTPError(f"unreadable answer: {error}"))
            self.close()
            return
        if status is not None:
            self.waiter.set_result(status)

    def _answer(self) -> int | None:
        """The status once the whole answer is in (it is then taken off the buffer)."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buffer[:end + 2]).lower()
        start = head.find(b"\r\ncontent-length:")  # at a line's start (not x-...-content-length)
        if start < 0:
            raise ValueError("no Content-Length (chunked answers are not read here)")
        stop = head.find(b"\r\n", start + 2)
        total = end + 4 + int(head[start + 17:stop])
        if len(self.buffer) < total:
            return None
        status = int(self.buffer[9:12])
        self.keep_alive = b"\r\nconnection: close" not in head
        del self.buffer[:total]
        return status

    def send(self, request: bytes) -> asyncio.Future[int]:
        """A future for the status of the answer to ``request``."""
        if self.transport is None:
            raise HTTPError("not connected")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
            self.closed = True


class Client:
    """Requests to one ``http://host:port`` base URL over a pool of keep-alive connections."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        rest = base_url.split("://", 1)[1].rstrip("/")
        self.host, _, port = rest.partition(":")
        self.port = int(port or 80)
        self.timeout_s = timeout_s
        self.idle: list[Connection] = []
        self.every: set[Connection] = set()
        self._requests: dict[int, bytes] = {}

    def request_bytes(self, body: Body) -> bytes:
        cached = self._requests.get(id(body))
        if cached is None:
            headers = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
            cached = (f"POST {body.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                      f"Content-Length: {len(body.data)}\r\n{headers}\r\n").encode() + body.data
            self._requests[id(body)] = cached
        return cached

    async def _connection(self) -> Connection:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(Connection, self.host, self.port)
        self.every.add(connection)
        return connection

    async def post(self, body: Body) -> int:
        """The answer's status; raises ``HTTPError``, ``OSError`` or ``TimeoutError``."""
        request = self.request_bytes(body)
        connection = await self._connection()
        waiter = connection.send(request)
        timer = asyncio.get_running_loop().call_later(self.timeout_s, _expire, waiter)
        try:
            status = await waiter
        except BaseException:
            connection.close()
            self.every.discard(connection)
            raise
        finally:
            timer.cancel()
        if connection.keep_alive and not connection.closed:
            self.idle.append(connection)
        else:
            connection.close()
            self.every.discard(connection)
        return status

    def close(self) -> None:
        for connection in self.every:
            connection.close()
        self.every.clear()
        self.idle.clear()


def _expire(waiter: asyncio.Future[int]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
