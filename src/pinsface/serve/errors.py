"""Every error the server answers, as JSON ``{"code", "message", ...}``: ``ApiError`` and the exception handlers
that turn FastAPI's and Starlette's own errors into it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import HTTPException

log = logging.getLogger(__name__)

# The code of an error FastAPI or Starlette raises itself, by status.
STATUS_CODES = {
    400: "bad_request",
    401: "missing_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "busy",
}


class ApiError(HTTPException):
    """An error answered as JSON ``{"code": ..., "message": ...}``. An HTTPException, so FastAPI's body parsing
    lets it through (it turns any other exception there into a 400)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, **extra):
        super().__init__(status, message, headers)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def retry_later(code: str, message: str, retry_after_s: int) -> ApiError:
    """A 503 with ``Retry-After``: the server (or the run folder) is busy now, and will not be for long."""
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after_s)})


def queue_full(exc: Exception, retry_after_s: int) -> ApiError:
    """The answer to ``batcher.QueueFull``: too many photos are waiting to be named."""
    return retry_later("busy", f"the server is busy: {exc}; retry later", retry_after_s)


def json_response(exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"code": exc.code, "message": exc.message, **exc.extra}, status_code=exc.status, headers=exc.headers
    )


def _from_http_error(request, exc) -> ApiError:
    code = STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return ApiError(exc.status_code, code, message, headers=getattr(exc, "headers", None))


def _from_validation_error(exc) -> ApiError:
    errors = [
        {"where": ".".join(str(part) for part in e.get("loc", ())), "problem": str(e.get("msg", ""))}
        for e in exc.errors()
    ]
    message = "; ".join(f"{e['where']}: {e['problem']}" for e in errors) or "invalid request"
    return ApiError(422, "validation_error", message, errors=errors)


def add_error_handlers(app, count: Callable[[str], None]) -> None:
    """Answer every error raised in ``app`` as JSON, calling ``count(code)`` for each."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def answer(exc: ApiError):
        count(exc.code)
        return json_response(exc)

    async def on_api_error(request, exc: ApiError):
        return answer(exc)

    async def on_http_error(request, exc):
        return answer(_from_http_error(request, exc))

    async def on_validation_error(request, exc):
        return answer(_from_validation_error(exc))

    async def on_unexpected(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(ApiError(500, "internal_error", f"unexpected error: {type(exc).__name__}"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
