"""The server's ASGI middleware: the API key, the body size limit, a JSON content
type, CORS for the origins the server allows, and the HTTP metrics."""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.datastructures import Headers

from plait.runtime.server.config import ServerConfig
from plait.runtime.server.errors import BodyTooLarge, error_response
from plait.runtime.server.metrics import Metrics


def install_middleware(app: FastAPI, config: ServerConfig, metrics: Metrics) -> None:
    app.add_middleware(_Gate, config=config, metrics=metrics)
    if config.allow_origins:  # outermost, so preflight requests get their answer
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST", "PUT", "OPTIONS"],
            allow_headers=["authorization", "content-type"],
        )


class _Gate:
    """The API key, the body size limit, a JSON content type and the HTTP metrics, as a
    plain ASGI middleware: ``@app.middleware("http")`` (BaseHTTPMiddleware) would hide a
    client's disconnect from ``request.is_disconnected()``, so a request whose client
    went away would run to its end."""

    open_paths = frozenset({"/health"})

    def __init__(self, app: Any, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                # The route's template, not the raw path: /v1/models/{anything} must not
                # make a new label value per request.
                route = getattr(scope.get("route"), "path", None) or "other"
                self.metrics.http(route, message["status"], time.perf_counter() - start)
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_counted)
            return
        limit, received = self.config.max_request_bytes, 0

        async def receive_limited() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, receive_limited, send_counted)

    def _refusal(self, scope: dict) -> Response | None:
        config, headers = self.config, Headers(scope=scope)
        if config.api_key and scope["path"] not in self.open_paths:
            # The scheme is case-insensitive (RFC 9110): "bearer KEY" is as good.
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), config.api_key.encode()
            ):
                return error_response(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    type="authentication_error",
                    code="invalid_api_key",
                )
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if has_body and not _is_json(headers.get("content-type", "")):
            # A web page can POST text/plain or a form to localhost without a CORS check;
            # requiring JSON keeps it from driving the server.
            return error_response(
                415,
                "the request body must be JSON, sent with 'Content-Type: application/json' "
                f"(got {headers.get('content-type') or 'none'!r})",
                code="unsupported_media_type",
            )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return error_response(400, f"bad Content-Length {length!r}")
            if int(length) > config.max_request_bytes:
                return error_response(
                    413,
                    f"request body of {length} bytes is over the limit of "
                    f"{config.max_request_bytes} bytes",
                    code="request_too_large",
                )
        return None


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )
