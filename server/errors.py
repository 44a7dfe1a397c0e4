"""One error module: every exception the server can meet, mapped to an HTTP status and an
OpenAI error body (`{"error": {"message", "type", "param", "code"}}`).

The JSON responses (exception handlers) and the streaming path (an error event inside an SSE
stream) both call `classify_error`, so a given failure reads the same on both. The table
`ERROR_MAP` is ordered: the first class an exception is an instance of wins, so subclasses come
before their bases. Anything unmapped is a 500 whose message names only the exception's type.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import memory_store as ms

from .engine.facade import EngineError
from .sessions import SessionBusy, TurnError

log = logging.getLogger("deltamem.server")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error a handler raises with its status, OpenAI type and code spelled out."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)


# exception class -> (status, OpenAI error type, code); first match wins.
ERROR_MAP: list[tuple[type[BaseException], int, str, str]] = [
    (SessionBusy, 409, "invalid_request_error", "session_busy"),
    (ms.SessionNotFound, 404, "invalid_request_error", "session_not_found"),
    (ms.InvalidSessionId, 400, "invalid_request_error", "invalid_session_id"),
    (ms.VersionConflict, 409, "invalid_request_error", "session_conflict"),
    (ms.IdentityMismatch, 409, "invalid_request_error", "session_identity_mismatch"),
    # A record the store holds that does not decode: the server's fault, not the client's (an
    # import of bad bytes is a 422 the import endpoint raises itself).
    (ms.CorruptRecord, 500, "server_error", "corrupt_session"),
    (ms.TooManySessions, 429, "invalid_request_error", "too_many_sessions"),
    (ms.StoreUnavailable, 503, "service_unavailable", "store_unavailable"),
    (ms.StoreError, 500, "server_error", "store_error"),
    (EngineError, 503, "server_error", "engine_error"),
]


def classify_error(exc: BaseException) -> tuple[int, ErrorDetail]:
    """Status and OpenAI error body of an exception."""
    if isinstance(exc, APIError):
        return exc.status, ErrorDetail(message=exc.message, type=exc.type, code=exc.code,
                                       param=exc.param)
    if isinstance(exc, TurnError):  # carries its own status, code and param
        return exc.status, ErrorDetail(message=str(exc), type="invalid_request_error",
                                       code=exc.code, param=exc.param)
    for cls, status, type_, code in ERROR_MAP:
        if isinstance(exc, cls):
            return status, ErrorDetail(message=str(exc), type=type_, code=code)
    return 500, ErrorDetail(message=f"internal error: {type(exc).__name__}",
                            type="server_error", code="internal")


def error_body(exc: BaseException) -> tuple[int, dict]:
    """Status and JSON-ready body; 5xx are logged here, once, for both paths."""
    status, detail = classify_error(exc)
    if status >= 500:
        log.error("request failed with %d: %r", status, exc)
    return status, ErrorResponse(error=detail).model_dump()


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


def install_error_handlers(app: FastAPI, on_error=None) -> None:
    """Register the handlers. `on_error(code_or_type)` counts each mapped error (metrics)."""

    async def known(request: Request, exc: Exception):
        status, body = error_body(exc)
        if on_error is not None:
            on_error(body["error"]["code"] or body["error"]["type"])
        return JSONResponse(body, status_code=status)

    for cls in (APIError, TurnError, *(c for c, *_ in ERROR_MAP)):
        app.add_exception_handler(cls, known)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", code="invalid_json")
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        # 400, as OpenAI and vLLM answer a request whose fields are invalid.
        return error_response(400, f"{loc or 'body'}: {first.get('msg', 'invalid')}",
                              code="invalid_value", param=loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail),
                              code={404: "not_found", 413: "body_too_large"}.get(
                                  exc.status_code))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return await known(request, exc)
