"""``plait serve``: load the model, build the app, run uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from plait.runtime.server.app import ServerConfig, create_app

logger = logging.getLogger(__name__)


def serve(
    host: str = "127.0.0.1",
    port: int = 30000,
    server: ServerConfig | None = None,
    log_level: str = "info",
    **engine_options: Any,
) -> None:
    """Serve until interrupted; uvicorn handles SIGINT/SIGTERM and the app's
    shutdown hook stops the engine."""
    from plait.runtime.engine import Engine

    engine = Engine(**engine_options)
    config = server or ServerConfig()
    app = create_app(engine, config)
    logger.info(
        "plait serving %s as %r on http://%s:%d (OpenAI routes under /v1)",
        engine.source.model_path,
        config.served_model_name,
        host,
        port,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower())
