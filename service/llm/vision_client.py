"""How an LLM worker gets an image encoded that has no stored features: its own process's vision
worker (``serve all``), or a remote one at ``settings.vision_url`` (a vision worker or the gateway)."""

from __future__ import annotations

import logging
import math
from typing import Any

import httpx
from fastapi import Request

from service import tracing
from service.errors import ApiError, unavailable

log = logging.getLogger(__name__)

# Headers passed on to the vision worker: its API keys are usually the same, and the request id
# ties both workers' log lines together.
_FORWARDED = ("authorization", "x-request-id")


class RemoteVision:
    """``POST /v1/images`` on a remote vision worker, with timeouts; failures become our errors. Their
    messages do not name the worker's address (an internal one, for our log only)."""

    def __init__(self, url: str, *, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, transport=transport,
                                      timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def encode(self, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        """The vision worker's JSON metadata for these bytes (it stores the features in Redis)."""
        headers = {**headers, "Content-Type": "application/octet-stream"}
        try:
            with tracing.span("vision encode", kind="CLIENT", **{"server.address": self.url}):
                tracing.inject(headers)  # the vision worker's spans join this request's trace
                r = await self.http.post("/v1/images", content=data, headers=headers)
        except httpx.TimeoutException:
            log.warning("vision worker at %s did not answer in time", self.url)
            raise unavailable("vision_timeout", "the vision worker did not answer in time; retry shortly", 2.0) from None
        except httpx.HTTPError as exc:
            log.warning("vision worker at %s unreachable: %s: %s", self.url, type(exc).__name__, exc)
            raise unavailable("vision_unavailable", "no vision worker is reachable to encode the image; retry "
                              "shortly, or upload it to POST /v1/images first", 2.0) from None
        if r.status_code == 200:
            try:
                meta = r.json()
            except ValueError:
                meta = None
            if not isinstance(meta, dict):  # e.g. a gateway's HTML page: their fault, not the caller's
                log.warning("vision worker at %s answered 200 without JSON metadata", self.url)
                raise unavailable("vision_unavailable", "the vision worker answered without the image's metadata",
                                  5.0)
            return meta
        code, message = _error_of(r)
        if r.status_code in (400, 413, 415, 422):  # the image itself is bad: the caller's mistake
            raise ApiError(r.status_code, code, message)
        if r.status_code == 503:
            raise unavailable(code, f"vision worker: {message}", _retry_after(r))
        log.warning("vision worker at %s answered %d (%s: %s)", self.url, r.status_code, code, message)
        raise unavailable("vision_unavailable", f"the vision worker answered {r.status_code} ({code})", 5.0)


def _retry_after(r: httpx.Response, default: float = 2.0) -> float:
    """Retry-After in seconds; an HTTP-date or garbage (a gateway's) counts as ``default``."""
    try:
        value = float(r.headers.get("retry-after", default))
    except ValueError:
        return default
    return min(max(value, 0.0), 3600.0) if math.isfinite(value) else default


def _error_of(r: httpx.Response) -> tuple[str, str]:
    try:
        err = r.json()["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):  # not our JSON (a gateway's page): its text stays out of our messages
        return "http_error", f"the vision worker answered {r.status_code} without a JSON error"


async def encode_image(request: Request, data: bytes) -> str:
    """Have a vision worker encode ``data`` and store its features; returns the features' fingerprint."""
    state = request.app.state
    vision = getattr(state, "vision", None)
    if vision is not None:
        record, _ = await vision.encode(data)
        return record.fingerprint
    remote: RemoteVision | None = getattr(state, "remote_vision", None)
    if remote is None:
        raise unavailable("vision_unavailable",
                          "the image has no stored features and this LLM worker knows no vision worker to encode it "
                          "(set SPLITVL_VISION_URL); or upload it to POST /v1/images first", 5.0)
    headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
    rid = request.scope.get("state", {}).get("request_id")
    if rid:
        headers["x-request-id"] = rid
    meta = await remote.encode(data, headers)
    return str(meta.get("fingerprint", ""))
