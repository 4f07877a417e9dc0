"""An image generator that asks a server: any ``POST /v1/images/generations`` in
OpenAI's shape (plait's own, SGLang Diffusion, vLLM-Omni, OpenAI).

    gen = OpenAIImagesGenerator("http://127.0.0.1:30000", "sd-turbo")
    [[image]] = gen.generate([ImageRequest("a red fox", size=(512, 512), seed=1)])

Each request is one HTTP call asking for ``b64_json`` images; the extras OpenAI
lacks (``seed``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``)
are sent only when set. A call has ``timeout_s`` in all; a refused connection, a
dropped one and a 5xx (or 429) are retried ``retries`` times with a doubling
backoff. What cannot be fixed by trying again ends in an :class:`ImageBackendError`
naming the URL and what went wrong: the server is down, too slow, or answered junk
(not JSON, no images, bad base64, not a picture). A 4xx whose body names the field
is the caller's bad input: an ``ImageGenerationError`` for that field. Setting a
request's ``cancel`` closes its connection, so a server that stops work for a
client that went away (plait does) stops too.

The connection is direct (``http.client``): no environment proxy is used.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import json
import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait.multimodal.generation import GenerationCancelled, ImageGenerationError, ImageRequest
from plait.multimodal.image import ImageError, load_image_bytes

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

# ImageRequest's fields -> the request body's names, where they differ.
WIRE_NAMES = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class ImageBackendError(ConnectionError):
    """The image server could not be used: unreachable, too slow, failing, or its
    answer is not images. ``url`` is the endpoint, ``reason`` what went wrong."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"image backend {url}: {reason}")


@dataclass
class _Reply:
    status: int
    body: bytes


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not."""


class OpenAIImagesGenerator:
    """An ImageGenerator over HTTP. ``base_url`` is the server's root or its ``/v1``
    (as OpenAI clients take it); ``model`` is sent as the request's ``model`` (None:
    not sent, the server's default) and is this generator's ``name``."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ):
        parts = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url={base_url!r}: must be an http:// or https:// URL")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s={timeout_s!r}: must be > 0")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries={retries!r}: must be an integer >= 0")
        path = parts.path if parts.path.endswith("/v1") else parts.path + "/v1"
        self.path = path + "/images/generations"
        self.url = f"{parts.scheme}://{parts.netloc}{self.path}"
        self._parts = parts
        self.model, self.name = model, model or "image-backend"
        self.api_key, self.timeout_s = api_key, timeout_s
        self.retries, self.backoff_s = retries, backoff_s

    def generate(self, requests: list[ImageRequest]) -> list[list[Image.Image]]:
        for r in requests:
            r.check()
        return [self._generate_one(r) for r in requests]

    def close(self) -> None:
        pass  # every call has its own connection

    # ---- one request ---------------------------------------------------------------------

    def _generate_one(self, request: ImageRequest) -> list[Image.Image]:
        body = json.dumps(self.request_body(request)).encode()
        attempts = self.retries + 1
        for attempt in range(attempts):
            if request.cancel.is_set():
                raise GenerationCancelled(f"cancelled before calling {self.url}")
            try:
                reply = self._post(body, request.cancel)
                if reply.status in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {reply.status}: {_error_text(reply.body)}")
            except _Retryable as e:
                if attempt + 1 == attempts:
                    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
                    raise ImageBackendError(self.url, f"{e}{tries}") from None
                delay = self.backoff_s * 2**attempt
                logger.warning("%s: %s; retrying in %.2fs", self.url, e, delay)
                if request.cancel.wait(delay):
                    raise GenerationCancelled(f"cancelled while retrying {self.url}") from None
                continue
            return self._images(reply, request)
        raise AssertionError("unreachable")

    def request_body(self, request: ImageRequest) -> dict[str, Any]:
        """The JSON body for ``request``."""
        body: dict[str, Any] = {"prompt": request.prompt, "n": request.n}
        if self.model is not None:
            body["model"] = self.model
        if request.size is not None:
            body["size"] = f"{request.size[0]}x{request.size[1]}"
        body["response_format"] = "b64_json"
        for name in ("seed", "negative_prompt", "steps", "guidance"):
            value = getattr(request, name)
            if value is not None:
                body[WIRE_NAMES.get(name, name)] = value
        return body

    def _images(self, reply: _Reply, request: ImageRequest) -> list[Image.Image]:
        if 400 <= reply.status < 500:
            raise self._refusal(reply, request)
        if reply.status != 200:
            raise ImageBackendError(self.url, f"HTTP {reply.status}: {_error_text(reply.body)}")
        try:
            data = json.loads(reply.body)
        except (ValueError, RecursionError):
            raise ImageBackendError(
                self.url, f"the answer is not JSON: {_snippet(reply.body)}"
            ) from None
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise ImageBackendError(self.url, f"the answer has no images: {_snippet(reply.body)}")
        if len(items) != request.n:
            raise ImageBackendError(
                self.url, f"asked for {request.n} images, the answer has {len(items)}"
            )
        return [self._decode(item, i) for i, item in enumerate(items)]

    def _decode(self, item: Any, index: int) -> Image.Image:
        where = f"data[{index}]"
        text = item.get("b64_json") if isinstance(item, dict) else None
        if not isinstance(text, str):
            has_url = isinstance(item, dict) and item.get("url")
            why = "a URL instead of b64_json" if has_url else "no b64_json"
            raise ImageBackendError(self.url, f"{where} has {why}")
        try:
            raw = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageBackendError(self.url, f"{where}.b64_json is not base64 ({e})") from None
        try:
            return load_image_bytes(raw, f"{where}.b64_json").image
        except ImageError as e:
            raise ImageBackendError(self.url, str(e)) from None

    def _refusal(self, reply: _Reply, request: ImageRequest) -> Exception:
        """A 4xx: the server's error, for the field it names (in ImageRequest's names)."""
        message, param = _error_text(reply.body), None
        with contextlib.suppress(ValueError, RecursionError, AttributeError, TypeError):
            error = json.loads(reply.body)["error"]
            param = error.get("param")
        if reply.status in (401, 403):
            return ImageBackendError(
                self.url, f"HTTP {reply.status} (check the API key): {message}"
            )
        if not isinstance(param, str) or not param:
            return ImageBackendError(self.url, f"HTTP {reply.status}: {message}")
        field = {v: k for k, v in WIRE_NAMES.items()}.get(param, param)
        value = getattr(request, field, None)
        return ImageGenerationError(field, value, f"the image backend refused it: {message}")

    # ---- the HTTP call -------------------------------------------------------------------

    def _post(self, body: bytes, cancel: threading.Event) -> _Reply:
        """One POST, run in a helper thread so that ``cancel`` and the deadline can cut
        it short by shutting its socket."""
        parts = self._parts
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(parts.hostname, parts.port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                conn.request("POST", self.path, body, headers)
                response = conn.getresponse()
                outcome["reply"] = _Reply(response.status, response.read())
            except BaseException as e:  # handed to the waiting thread
                outcome["error"] = e

        worker = threading.Thread(target=call, name="plait-images-http", daemon=True)
        deadline = time.monotonic() + self.timeout_s
        worker.start()
        try:
            while worker.is_alive():
                if cancel.wait(0.02):
                    raise GenerationCancelled(f"cancelled while waiting for {self.url}")
                if time.monotonic() > deadline:
                    raise ImageBackendError(self.url, f"no answer within {self.timeout_s:g}s")
        finally:
            if worker.is_alive():  # cut the connection: the server sees its client leave
                with contextlib.suppress(OSError, AttributeError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
                worker.join(5)
            conn.close()
        if "reply" in outcome:
            return outcome["reply"]
        error = outcome["error"]
        if isinstance(error, (TimeoutError, socket.timeout)):
            raise ImageBackendError(self.url, f"no answer within {self.timeout_s:g}s")
        if isinstance(error, (ConnectionError, http.client.HTTPException, OSError)):
            raise _Retryable(_connection_problem(error))
        raise error


def _connection_problem(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host ({error})"
    return f"connection failed ({type(error).__name__}: {error})"


def _error_text(body: bytes) -> str:
    """The message of an OpenAI-style error body, else the body's start."""
    with contextlib.suppress(ValueError, RecursionError, KeyError, TypeError):
        message = json.loads(body)["error"]["message"]
        if isinstance(message, str):
            return message
    return _snippet(body)


def _snippet(body: bytes, limit: int = 120) -> str:
    text = body.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "...") if text else "(empty body)"
