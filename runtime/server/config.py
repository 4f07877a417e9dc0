"""ServerConfig: how one server presents its engine (its name, key, limits)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str = "smollm2"  # the only model name shown and accepted; never a path
    api_key: str | None = None
    max_request_bytes: int = 4 * 2**20  # request bodies past this get 413, before tokenizing
    # Origins a browser may call from (CORS); none by default, so no web page can.
    allow_origins: tuple[str, ...] = ()
    # max_tokens of a chat completion that gives none (OpenAI: "until the context ends").
    chat_default_max_tokens: int = 1024
    # /generate streams carry only what is new in each event (SGLang's
    # --incremental-streaming-output); a request's incremental_streaming_output wins.
    incremental_streaming_output: bool = False
    # Where /start_profile's traces go; None: profiling is off (a client cannot choose
    # where the server writes, nor leave a profiler growing on a server not meant for it).
    profile_dir: str | None = None

    def __post_init__(self) -> None:
        name = self.served_model_name
        if (
            not name
            or name != name.strip()
            or os.path.isabs(name)
            or name.startswith(("~", "."))
            or "\\" in name
        ):
            raise ValueError(
                f"served model name {name!r} must be a name (like 'smollm2' or "
                "'org/model'), not a path: clients see it"
            )
