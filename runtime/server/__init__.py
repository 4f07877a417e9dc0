"""The HTTP server: SGLang's native API and OpenAI's over one Engine (app.py with
native.py, openai_api.py with openai_output.py; both use errors.py, streaming.py,
middleware.py and config.py), request models (protocol.py), Prometheus metrics
(metrics.py), and ``serve`` for the ``plait serve`` command."""

from __future__ import annotations

from plait.runtime.server.app import APIError, ServerConfig, create_app
from plait.runtime.server.serve import serve

__all__ = ["APIError", "ServerConfig", "create_app", "serve"]
