"""The one place where errors become HTTP responses: status code + OpenAI error JSON.

Every failure path of the server (route handlers, request validation, the auth / body-size middleware,
unknown routes, unexpected exceptions) ends in `error_response(exc)`, which returns

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

with the status code from the table below.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from thrifty.errors import (InvalidRequestError, ModelFileError, ModelNotFoundError, ModelNotServedError, ThriftyError,
                            UnsupportedModelError)
from thrifty.gateway.backends import BackendError, TierTimeoutError
from thrifty.server.key_limits import BudgetExceededError, KeyRateLimitError

log = logging.getLogger("thrifty.server")


class AuthenticationError(ThriftyError):
    """No bearer token, or the wrong one."""


class ServerBusyError(ThriftyError):
    """The waiting queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, f"retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class PayloadTooLargeError(ThriftyError):
    """The request body is larger than the server's limit."""


class PromptOverDeadlineError(InvalidRequestError):
    """A prompt this machine cannot prefill within its tier's timeout, even with nothing else to do."""


class ShuttingDownError(ThriftyError):
    """The server is draining for shutdown and takes no new requests."""


# exception class -> (HTTP status, OpenAI error type, code). First match wins, so subclasses go first.
_TABLE: list[tuple[type[BaseException], int, str, str | None]] = [
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (ModelNotServedError, 404, "invalid_request_error", "model_not_found"),
    (PayloadTooLargeError, 413, "invalid_request_error", "payload_too_large"),
    (ServerBusyError, 429, "rate_limit_error", "server_busy"),
    (BudgetExceededError, 402, "insufficient_quota", "budget_exceeded"),
    (KeyRateLimitError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (ShuttingDownError, 503, "service_unavailable_error", "shutting_down"),
    (PromptOverDeadlineError, 400, "invalid_request_error", "prompt_over_deadline"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (TierTimeoutError, 504, "server_error", "tier_timeout"),
    (BackendError, 502, "server_error", "tier_failed"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (ModelFileError, 500, "server_error", None),
    (UnsupportedModelError, 500, "server_error", None),
    (ThriftyError, 500, "server_error", None),
]

_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def classify(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, OpenAI error JSON, extra headers) for any exception."""
    if isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        type_ = _HTTP_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        return status, error_body(detail, type_, None, status), dict(exc.headers or {})
    for cls, status, type_, code in _TABLE:
        if isinstance(exc, cls):
            headers = {}
            if isinstance(exc, (ServerBusyError, KeyRateLimitError)):
                headers["Retry-After"] = str(exc.retry_after_s)
            param = getattr(exc, "param", None)
            if status >= 500:
                log.error("request failed: %s", exc)
            return status, error_body(str(exc), type_, param, code), headers
    log.exception("unexpected server error", exc_info=exc)
    return 500, error_body(f"internal server error ({type(exc).__name__})", "server_error", None, None), {}


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = classify(exc)
    return JSONResponse(body, status_code=status, headers=headers)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z_-]+\[.*\]|function-.*)$", re.I)


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequestError:
    """A pydantic / FastAPI validation error list as one InvalidRequestError naming the first bad field."""
    if not errors:
        return InvalidRequestError("the request body is invalid")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequestError("the request body is not valid JSON", "send a JSON object", param=None)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "missing" and not loc:
        return InvalidRequestError("the request has no JSON body", "send a JSON object", param=None)
    if not loc and first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        return InvalidRequestError("the request body must be a JSON object", "send a JSON object", param=None)
    # Union members add a type tag to the location ("prompt.str"); name the field, not the member.
    param = ".".join(p for p in loc if not _TYPE_TAG.match(p)) or None
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ())][:2] == [str(p) for p in first["loc"]][:2]]
    if len(same_field) > 1 and any(_TYPE_TAG.match(p) for p in loc):
        kinds = sorted({next((str(p) for p in e["loc"] if _TYPE_TAG.match(str(p))), "?") for e in same_field})
        return InvalidRequestError(f"'{param}' has the wrong type or value; it must be one of: {', '.join(kinds)} "
                                   f"({first.get('msg', 'invalid value')})", param=param)
    msg = first.get("msg", "invalid value")
    where = f"'{param}'" if param else "the request body"
    return InvalidRequestError(f"{where}: {msg}", param=param)
