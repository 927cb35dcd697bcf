"""What every request meets first: its API key, then a bound on its body, before the app reads a byte.

A pure ASGI middleware, outside FastAPI's routing: a route's dependencies run only after FastAPI
has read and parsed the body they come with (a 1.5 GB JSON body was parsed before its 401).

* API keys (when configured): every path but ``/healthz`` needs ``Authorization: Bearer <key>``,
  compared in constant time; a request without one is answered 401 before its body is read.
* Body size, per path (``BodyLimit``): a declared ``Content-Length`` over the limit is answered
  413 at once; otherwise the body is counted as the app reads it, whatever its framing (chunked
  included), and the read that crosses the limit raises the 413 (``BodyRefused``, which FastAPI and
  Starlette's multipart parser pass on as it is).
* Body time: the whole body must have arrived ``body_timeout_s`` after the request began, or the
  read that waits past it raises 408 (a body trickled a byte at a time held its request forever).
* A response that starts before the request's body was read to its end (401, 413, an early error)
  closes the connection: the server would otherwise go on reading, and dropping, the rest of it.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError

PUBLIC_PATHS = frozenset({"/healthz"})
# what a path that reads no body may still carry (some clients send a small one with GET or DELETE)
NO_BODY_BYTES = 64 * 1024


class BodyRefused(HTTPException):
    """An ``ApiError`` raised while the app reads the body. FastAPI passes an HTTP exception raised
    there on as it is (any other error it turns into its own 400), and the app's error handler
    answers with the error carried (``service.errors``)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.status, error.message, error.headers)
        self.error = error


@dataclass(frozen=True)
class BodyLimit:
    max_bytes: int
    code: str  # the 413's error code
    takes: str  # what the route takes, for the 413's message: "an image of up to ... bytes"

    def error(self) -> ApiError:
        return ApiError(413, self.code, f"the request body is over {self.max_bytes} bytes; this endpoint takes "
                        f"{self.takes}")


NO_BODY = BodyLimit(NO_BODY_BYTES, "payload_too_large", "no body")


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The token of the first ``Authorization: Bearer <token>`` header, or b""."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def key_matches(token: bytes, keys: Iterable[bytes]) -> bool:
    ok = False
    for key in keys:  # no early exit: the time taken does not tell which key nearly matched
        ok |= hmac.compare_digest(token, key)
    return ok


def body_framing(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(Content-Length, chunked) as the server framed the body (uvicorn refuses a malformed length)."""
    length, chunked = None, False
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


class _Body:
    """One request's body as the app reads it: counted against its limit, due by a deadline, and the
    connection closed by a response that starts before it was read to its end.

    The deadline is one timer for the request, not one per read (``asyncio.timeout`` around every
    chunk cost ~3 us each): when it fires during a read, it cancels the reading task, and the read
    turns that cancellation into the 408."""

    def __init__(self, receive: Receive, send: Send, limit: BodyLimit, timeout_s: float) -> None:
        self._receive, self._send, self.limit, self.timeout_s = receive, send, limit, timeout_s
        self.unread = True  # body bytes the app has not read yet
        self.received = 0
        self.expired = False
        self._reading: asyncio.Task | None = None

    def expire(self) -> None:
        if self.unread:
            self.expired = True
            if self._reading is not None:
                self._reading.cancel()

    def _late(self) -> BodyRefused:
        return BodyRefused(ApiError(408, "body_timeout", f"the request body did not arrive within {self.timeout_s:g} s "
                                    "of the request (body_timeout_s); send it faster, or a smaller one"))

    async def receive(self) -> Message:
        if not self.unread:  # the body is in: what comes now is the disconnect, whenever it does
            return await self._receive()
        if self.expired:
            raise self._late()
        task = self._reading = asyncio.current_task()
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if self.expired and task is not None and task.uncancel() == 0:  # our deadline's, nobody else's
                raise self._late() from None
            raise
        finally:
            self._reading = None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit.max_bytes:
                raise BodyRefused(self.limit.error())
            self.unread = message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and self.unread:
            message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
        await self._send(message)


class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_keys: Iterable[str], limits: Mapping[str, BodyLimit],
                 body_timeout_s: float) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]
        self.limits = dict(limits)
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        length, chunked = body_framing(headers)
        body = None if not (length or chunked) else _Body(
            receive, send, self.limits.get(scope["path"], NO_BODY), self.body_timeout_s)
        if self.keys and scope["path"] not in PUBLIC_PATHS and not key_matches(bearer_token(headers), self.keys):
            error = ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                             headers={"WWW-Authenticate": 'Bearer realm="splitvl"'})
            await error.response()(scope, receive, send if body is None else body.send)
            return
        if body is None:  # nothing to bound
            await self.app(scope, receive, send)
            return
        if length is not None and length > body.limit.max_bytes:
            await body.limit.error().response()(scope, receive, body.send)
            return
        timer = asyncio.get_running_loop().call_later(self.body_timeout_s, body.expire)
        try:
            await self.app(scope, body.receive, body.send)
        finally:
            timer.cancel()
