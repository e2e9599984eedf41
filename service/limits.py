"""Request limits, enforced before any route sees the request's body.

``ConcurrencyLimitMiddleware`` caps the requests in flight per worker (503 with Retry-After at
once, before the body is read). ``BodyLimitMiddleware`` reads the whole body up front within
``body_timeout_s`` (a client that trickles its body is answered 408 instead of holding a worker)
and up to ``max_body_bytes`` (413 beyond, told at once from ``Content-Length`` when the client
sends one), and undoes its ``Content-Encoding`` (gzip, deflate) within the same limit counted on
the decoded size. The route then reads the buffered, decoded body, so a request whose body the
app has read is one it answers.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass

import orjson

from .metrics import REFUSAL_REASON

#: The content codings the server decodes, with their zlib window bits (RFC 9110 section 8.4.1:
#: "deflate" is the zlib format; "x-gzip" is gzip's old name). "identity" means no coding.
WINDOW_BITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
               "deflate": zlib.MAX_WBITS}
IDENTITY = "identity"


async def _reply(send, status: int, message: str,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


#: Paths the concurrency limit does not count: probes and scrapes.
UNLIMITED_PATHS = ("/v2/health/", "/metrics")


class ConcurrencyLimitMiddleware:
    """At most ``max_in_flight`` HTTP requests in flight in this worker: one past it is answered
    503 with ``Retry-After`` at once, before its body is read. A request is in flight from its
    complete head to the end of its answer; idle and half-open connections do not count (the
    server's header and keep-alive timeouts bound those). Health and metrics routes pass
    uncounted: an overloaded worker is alive, and a liveness probe must not restart it."""

    def __init__(self, app, max_in_flight: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNLIMITED_PATHS):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            scope[REFUSAL_REASON] = "concurrency"  # counted by the metrics middleware
            await _reply(send, 503, f"{self.in_flight} requests in flight; the limit is "
                                    f"{self.max_in_flight} per worker",
                         ((b"retry-after", b"1"),))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class RefusedBody(Exception):
    """A body the server does not read: the status and message to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def content_codings(header: bytes) -> list[str]:
    """The codings of a ``Content-Encoding`` header, in the order they were applied, without
    ``identity``; raises ``RefusedBody`` (415) naming a coding the server does not decode."""
    codings = [coding.strip().lower()
               for coding in header.decode("latin-1").split(",") if coding.strip()]
    for coding in codings:
        if coding != IDENTITY and coding not in WINDOW_BITS:
            raise RefusedBody(415, f"Content-Encoding {coding!r} is not supported; send the "
                                   "body plain, gzip or deflate")
    return [coding for coding in codings if coding != IDENTITY]


def decode_body(body: bytes, codings: list[str], limit: int) -> bytes:
    """``body`` with ``codings`` undone, the last applied first. Raises ``RefusedBody``: 400 for
    a body that is not valid in its coding, 413 as soon as the decoded body passes ``limit``
    bytes (decompression stops there, so however far a body would expand, it costs at most
    ``limit`` bytes)."""
    for coding in reversed(codings):
        body = _inflate(body, coding, limit)
    return body


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decompressed, member after member for gzip (a valid gzip body may hold several)."""
    parts: list[bytes] = []
    size = 0
    pending = data
    while True:
        inflater = zlib.decompressobj(WINDOW_BITS[coding])
        try:
            while not inflater.eof:
                part = inflater.decompress(pending, limit - size + 1)
                pending = inflater.unconsumed_tail
                size += len(part)
                if size > limit:
                    raise RefusedBody(413, f"the decompressed body passes the limit of "
                                           f"{limit:,} bytes")
                if not (part or pending or inflater.eof):
                    raise RefusedBody(400, f"the body is not valid {coding}: it ends early")
                parts.append(part)
        except zlib.error as error:
            raise RefusedBody(400, f"the body is not valid {coding}: {error}") from None
        pending = inflater.unused_data
        if not pending:
            return b"".join(parts)
        if coding == "deflate":
            raise RefusedBody(400, "the body is not valid deflate: data after the end of the "
                                   "stream")


@dataclass
class RequestLedger:
    """Requests whose body the app received (``accepted``) and those it finished answering
    (``answered``); the service logs both at shutdown, when they must agree."""

    accepted: int = 0
    answered: int = 0


class BodyLimitMiddleware:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float,
                 ledger: RequestLedger) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.ledger = ledger

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = None
        encodings: list[bytes] = []
        for name, value in scope["headers"]:  # one pass: this runs for every request
            if name == b"content-length":
                declared = value
            elif name == b"content-encoding":
                encodings.append(value)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, f"the body has {int(declared):,} bytes; the limit is "
                                    f"{self.max_body_bytes:,}")
            return
        try:
            codings = content_codings(b",".join(encodings)) if encodings else []
        except RefusedBody as refused:
            await _reply(send, refused.status, refused.message)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        await _reply(send, 413, f"the body passes the limit of "
                                                f"{self.max_body_bytes:,} bytes")
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await _reply(send, 408, f"the body did not arrive within {self.body_timeout_s:g} s")
            return
        body = b"".join(chunks)
        del chunks  # one copy of the body, not two, while the request runs
        if codings:
            try:
                # Off the event loop: zlib releases the GIL, and 64 MiB take 0.3 s here.
                body = await asyncio.to_thread(decode_body, body, codings, self.max_body_bytes)
            except RefusedBody as refused:
                await _reply(send, refused.status, refused.message)
                return
            # The routes see the decoded body as if it had been sent plain. The scope is changed
            # in place: the router records the matched route in it for the metrics middleware.
            scope["headers"] = [(name, value) for name, value in scope["headers"]
                                if name not in (b"content-encoding", b"content-length")]
            scope["headers"].append((b"content-length", str(len(body)).encode()))
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as usual

        async def counted_send(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.ledger.answered += 1

        self.ledger.accepted += 1
        await self.app(scope, replay, counted_send)
