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

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                 415: "unsupported_media_type"}
        message = str(exc.detail)
        if exc.status_code == 400:
            message = f"{message}: send a JSON object encoded as UTF-8"
        err = ApiError(exc.status_code, codes.get(exc.status_code, "http_error"), message)
        return err.response()

    app.add_exception_handler(ApiError, on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, on_http_error)  # type: ignore[arg-type]
