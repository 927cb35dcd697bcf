"""One error type for the whole service, rendered by one handler as the design's JSON body.

FastAPI is imported where a response is made: the engine and the encoder raise ``ApiError`` and
import without the HTTP stack (the GPU benchmarks run where it is not installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A failure the caller should see: ``{"error": {"code", "message"}}`` with ``status``.

    4xx for the caller's mistakes, 503 (with ``Retry-After``) for overload or a missing
    dependency. Anything else that escapes a handler is a bug and becomes a 500.
    """

    def __init__(self, status: int, code: str, message: str, *, retry_after: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        from fastapi.responses import JSONResponse

        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return JSONResponse(
            {"error": {"code": self.code, "message": self.message}}, status_code=self.status, headers=headers
        )


def unavailable(code: str, message: str, retry_after: float = 1.0) -> ApiError:
    return ApiError(503, code, message, retry_after=retry_after)


def internal_error(what: str) -> ApiError:
    """A bug's 500, in our format; what went wrong is in the server's log, not in the message."""
    return ApiError(500, "internal_error", f"{what} failed with an internal error; the server log has the details "
                    "(find it by this response's X-Request-Id)")


def _takes_json(request: Request) -> bool:
    from fastapi.routing import APIRoute

    route = request.scope.get("route")
    return isinstance(route, APIRoute) and route.body_field is not None


def install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return ApiError(422, "invalid_request", "; ".join(parts) or "invalid request").response()

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        carried = getattr(exc, "error", None)
        if isinstance(carried, ApiError):  # ours, wrapped to pass FastAPI's body parsing (service.guard)
            return carried.response()
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type"}
        message = str(exc.detail)
        if exc.status_code == 400 and _takes_json(request):  # FastAPI could not read the JSON body
            message = f"{message}: send a JSON object encoded as UTF-8"
        err = ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        return err.response()

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the exception and re-raises it after this answer (uvicorn then logs it too)
        return internal_error(f"{request.method} {request.url.path}").response()

    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, on_bug)
