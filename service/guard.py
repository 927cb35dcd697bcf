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


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """Content-Length as the server framed the body (uvicorn refuses a malformed one), or None."""
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


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
        length = declared_length(headers)
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
        unread = bool(length) or chunked  # body bytes the app has not read yet
        limit = self.limits.get(scope["path"], NO_BODY)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and unread:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        if self.keys and scope["path"] not in PUBLIC_PATHS and not key_matches(bearer_token(headers), self.keys):
            error = ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                             headers={"WWW-Authenticate": 'Bearer realm="splitvl"'})
            await error.response()(scope, receive, send_closing)
            return
        if length is not None and length > limit.max_bytes:
            await limit.error().response()(scope, receive, send_closing)
            return
        received = 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def receive_bounded() -> Message:
            nonlocal received, unread
            if not unread:  # the body is in: what comes now is the disconnect, whenever it does
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s "
                               "of the request (body_timeout_s); send it faster, or a smaller one") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.max_bytes:
                    raise BodyRefused(limit.error())
                unread = unread and message.get("more_body", False)
            return message

        await self.app(scope, receive_bounded, send_closing)
