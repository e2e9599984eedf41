"""Request body limits, enforced before any route sees the body.

The whole body is read up front within ``body_timeout_s`` (a client that trickles its body is
answered 408 instead of holding a worker) and up to ``max_body_bytes`` (413 beyond, told at once
from ``Content-Length`` when the client sends one). The route then reads the buffered body, so a
request whose body the app has read is one it answers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson


async def _reply(send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


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
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, f"the body has {int(declared):,} bytes; the limit is "
                                    f"{self.max_body_bytes:,}")
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
