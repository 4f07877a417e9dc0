"""Errors the server answers with, all in OpenAI's shape: ``{"error": {"message",
"type", "param", "code"}}``. Bad input is a 4xx naming the field, never a 500; a
string holding a lone surrogate is refused before any route sees it."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse as _JSONResponse
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from plait.runtime.engine import EngineShutdownError
from plait.runtime.errors import RequestError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )


class ClientDisconnected(Exception):
    pass


class JSONResponse(_JSONResponse):
    """A JSON response that can always be sent: text that UTF-8 cannot encode (a lone
    surrogate echoed from a request) is written as a JSON escape instead of failing."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: Any = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body that grows past the limit (one sent without a
    Content-Length, or longer than the one it declared)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")


# A JSON escape of a UTF-16 surrogate (U+D800..U+DFFF): the cheap test before a walk.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


async def refuse_lone_surrogates(request: Request) -> None:
    """A 400 naming the field for any string of the request (a value or a key, in the
    body or the path) holding a lone surrogate, JSON's ``"\\ud800"``: it is not
    Unicode, so it can be neither tokenized nor sent back (echoed in a result or an
    error, it would break the response, and the connection with it)."""
    for name, value in request.path_params.items():
        where = _lone_surrogate(value)
        if where is not None:
            raise _surrogate_error((name, *where[0]), value, where[1])
    if request.method not in ("POST", "PUT"):
        return
    body = await request.body()  # read once: the route gets the same bytes
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # the route's own parsing reports it
    where = _lone_surrogate(data)
    if where is not None:
        path, (text, index) = where
        raise _surrogate_error(path, text, index)


def _lone_surrogate(data: Any) -> tuple[tuple, tuple[str, int]] | None:
    """(path, (text, index)) of the first string (key or value) in ``data`` UTF-8
    cannot encode; iterative, as a body may nest deeply."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return path, (value, e.start)
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                stack.append(((*path, key), item))
                stack.append(((*path, key), key))  # the key itself, checked first
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return None


def _surrogate_error(path: tuple, text: str, index: int) -> APIError:
    param = ".".join(_printable(str(p)) for p in path) or None
    return APIError(
        400,
        f"{param or 'the request body'}: contains a lone surrogate {text[index]!a} at "
        f"character {index}, which is not valid Unicode",
        param=param,
        code="invalid_unicode",
    )


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


_TYPE_NAME = re.compile(r"^(str|int|float|bool|dict|list|none|[\w.]+\[.*\]|function-.*)$")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge) -> JSONResponse:
        return error_response(413, str(e.detail), code="request_too_large")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, e: RequestError) -> JSONResponse:
        return error_response(400, str(e), param=e.field)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            reason = (first.get("ctx") or {}).get("error", first.get("msg"))
            return error_response(400, f"the request body is not valid JSON: {reason}")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body is missing (expected a JSON object)")
        # Drop "body" and the union-member names pydantic puts in the path ("str", "list[int]").
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_NAME.match(str(p))]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more errors)"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type=kind)

    @app.exception_handler(EngineShutdownError)
    async def shut_down(request: Request, e: EngineShutdownError) -> JSONResponse:
        return error_response(503, str(e), type="server_error")

    @app.exception_handler(ClientDisconnected)
    async def gone(request: Request, e: ClientDisconnected) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error: {e!r}", type="server_error")
