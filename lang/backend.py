"""Where programs run: the one small interface the interpreter calls.

A backend answers requests shaped like the native ``/generate`` API (text or a
batch of texts, a ``sampling_params`` dict, the logprob options) with SGLang-
shaped result dicts (``text``, ``output_ids``, ``meta_info``). The interpreter
builds everything else from that: ``select`` is a batched logprob request,
caching a prefix is ``max_new_tokens=0``. So the program never knows a wire
format, and every backend reuses the runtime's prefix cache the same way.

* :class:`EngineBackend` -- an in-process :class:`plait.Engine`;
* :class:`RuntimeEndpoint` -- a plait (or SGLang) server over HTTP.

With no backend set, the first program run starts an embedded engine with the
default model.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from plait.runtime.chat_template import PLAIN, ChatTemplate

logger = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A backend refused or failed a request; ``status`` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Backend(ABC):
    chat_template: ChatTemplate = PLAIN
    model_name: str = "model"
    supports_images: bool = False

    @abstractmethod
    def generate(
        self,
        text: str | list[str],
        sampling_params: dict[str, Any] | list[dict[str, Any]],
        **options: Any,
    ) -> dict | list[dict]:
        """One request (or a batch): ``options`` are the native API's top-level fields
        (return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs)."""

    @abstractmethod
    def generate_stream(
        self, text: str, sampling_params: dict[str, Any], **options: Any
    ) -> Iterator[dict]:
        """Incremental result dicts: each ``text`` is the new piece; the last one has
        ``meta_info["finish_reason"]`` set."""

    def get_model_name(self) -> str:
        """The name of the model behind this backend (SGLang's backends have it too)."""
        return self.model_name

    def flush_cache(self) -> bool:
        return False

    def get_server_info(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:  # noqa: B027 -- optional hook
        """Release what the backend holds (an embedded engine); a no-op by default."""


class EngineBackend(Backend):
    """Programs on an in-process engine (the same request path as the server)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.chat_template = engine.chat_template
        self.model_name = engine.model_name  # a name, never the path of the weights
        self.supports_images = bool(engine.input_limits.supports_images)

    def generate(self, text, sampling_params, **options):
        return self.engine.generate(_engine_input(text, sampling_params, options))

    def generate_stream(self, text, sampling_params, **options):
        return self.engine.generate(_engine_input(text, sampling_params, options, stream=True))

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


class RuntimeEndpoint(Backend):
    """A server speaking the native API: ``/generate``, ``/get_model_info``,
    ``/flush_cache``, ``/get_server_info``. The chat template comes from the
    server (plait sends its role layout in ``/get_model_info``), else from the
    model's tokenizer when its files are local, else a plain layout."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        info = self._request("GET", "/get_model_info")
        self.model_info = info
        self.model_name = info.get("model_path", "model")
        self.supports_images = bool(
            info.get("has_image_understanding", info.get("is_multimodal", False))
        )
        if "chat_template" in info and isinstance(info["chat_template"], dict):
            self.chat_template = ChatTemplate.from_dict(info["chat_template"])
        else:
            self.chat_template = _template_from_path(info.get("tokenizer_path") or self.model_name)

    def generate(self, text, sampling_params, **options):
        return self._request("POST", "/generate", _body(text, sampling_params, options))

    def generate_stream(self, text, sampling_params, **options):
        body = {**_body(text, sampling_params, options), "stream": True}
        sent = 0
        for event in self._events("/generate", body):
            piece = event["text"][sent:]  # the server sends the cumulative text
            sent = len(event["text"])
            yield {**event, "text": piece}

    def flush_cache(self) -> bool:
        self._request("POST", "/flush_cache", None, raw=True)
        return True

    def get_server_info(self) -> dict[str, Any]:
        return self._request("GET", "/get_server_info")

    # -- HTTP -----------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise BackendError(_error_message(e.read()), e.code) from None
        except urllib.error.URLError as e:
            raise BackendError(f"cannot reach {self.base_url}: {e.reason}") from None

    def _request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        with self._open(method, path, body) as resp:
            payload = resp.read()
        return payload if raw else json.loads(payload)

    def _events(self, path: str, body: Any) -> Iterator[dict]:
        with self._open("POST", path, body) as resp:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[len(b"data:") :].strip()
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise BackendError(_error_message(data))
                yield event


def _engine_input(text: Any, sampling_params: Any, options: dict[str, Any], stream: bool = False):
    """The engine's GenerateInput of a backend call (``options``: the native API's
    top-level fields, ``input_ids`` and ``image_data`` among them)."""
    from plait.runtime.inputs import GenerateInput, image_data_lists

    options = dict(options)
    image_data = options.pop("image_data", None)
    inp = GenerateInput(prompt=text, sampling_params=sampling_params, stream=stream, **options)
    inp.images = image_data_lists(image_data, inp.prompt, inp.input_ids)
    return inp


def _body(text: Any, sampling_params: Any, options: dict[str, Any]) -> dict[str, Any]:
    body = {"text": text, "sampling_params": sampling_params}
    body.update({k: v for k, v in options.items() if v is not None})
    if body.get("image_data") is not None:
        body["image_data"] = _wire_images(body["image_data"])
    return body


def _wire_images(data: Any) -> Any:
    """``image_data`` as it goes over HTTP: each image as base64 text (of a PNG, which
    keeps its pixels, so the server hashes the same image), in the same shape."""
    if isinstance(data, list):
        return [_wire_images(d) for d in data]
    if data is None:
        return None
    from plait.multimodal.image import load_image

    return load_image(data).to_data_url().partition(",")[2]


def _error_message(payload: bytes) -> str:
    try:
        err = json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")
    if isinstance(err, dict) and isinstance(err.get("error"), dict):
        return err["error"].get("message", str(err))
    return str(err)


def _template_from_path(path: str) -> ChatTemplate:
    try:
        from transformers import AutoTokenizer

        return ChatTemplate.from_tokenizer(
            AutoTokenizer.from_pretrained(path, local_files_only=True)
        )
    except Exception as e:  # a remote server's model files are usually not here
        logger.warning("no chat template for %s (%s); using a plain layout", path, e)
        return PLAIN


# ---- the default backend ----------------------------------------------------------------

_default: Backend | None = None
_default_lock = threading.Lock()
_engine_backends: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def as_backend(obj: Any) -> Backend:
    """A Backend for ``obj``: a Backend, a plait Engine, or a server URL."""
    if isinstance(obj, Backend):
        return obj
    if isinstance(obj, str):
        return RuntimeEndpoint(obj)
    from plait.runtime.engine import Engine

    if isinstance(obj, Engine):
        backend = _engine_backends.get(obj)
        if backend is None:
            backend = _engine_backends[obj] = EngineBackend(obj)
        return backend
    raise TypeError(f"backend={obj!r}: expected a plait Engine, a Backend or a server URL")


def set_default_backend(backend: Any) -> None:
    """The backend programs run on when ``run`` gets none."""
    global _default
    with _default_lock:
        _default = as_backend(backend) if backend is not None else None


def current_default_backend() -> Backend | None:
    """The default backend if one is set or started, else None (starts nothing)."""
    return _default


def get_default_backend() -> Backend:
    """The default backend; the first call with none set starts the embedded engine
    with the default model."""
    global _default
    with _default_lock:
        if _default is None:
            from plait.runtime.engine import Engine

            logger.info("no backend set: starting the embedded engine with the default model")
            _default = EngineBackend(Engine())
        return _default
