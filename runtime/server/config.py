"""ServerConfig: how one server presents its engine (its name, key, limits)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from plait.multimodal.generation import SCHEDULER_NAMES

if TYPE_CHECKING:
    from plait.multimodal.media import MediaPolicy


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
    # Images a request may make the server read (plait.multimodal.media): local files
    # only under this directory (None: no local file), URLs only from these exact host
    # names (None: any host), each fetch within a deadline and a byte limit.
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    media_fetch_timeout_s: float = 5.0
    max_media_bytes: int = 20 * 2**20
    # The image generator of /v1/images/generations (runtime/server/images_api.py): a
    # local diffusers pipeline directory, or the URL of a server with that route (its
    # model name, API key and per-call timeout); neither: the route says how to set one.
    image_model: str | None = None
    image_backend: str | None = None
    image_backend_model: str | None = None
    image_backend_api_key: str | None = None
    image_backend_timeout_s: float = 300.0
    # The local pipeline's scheduler by name (None: its own), seconds idle before its
    # weights leave the device (None: never), and the most images in one pipeline call.
    image_scheduler: str | None = None
    image_idle_offload_s: float | None = None
    image_max_batch: int = 8
    # Each batched image equal bit for bit to its request run alone (slower; see
    # plait.multimodal.batch_invariant).
    image_batch_invariant: bool = False

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
        _ = self.media_policy  # checks the media fields now, not at the first image
        if self.image_model is not None and self.image_backend is not None:
            raise ValueError("image_model and image_backend: give one image generator, not both")
        if not self.image_backend_timeout_s > 0:
            raise ValueError(
                f"image_backend_timeout_s={self.image_backend_timeout_s!r}: must be > 0"
            )
        if self.image_scheduler not in (None, *SCHEDULER_NAMES):
            raise ValueError(
                f"image_scheduler={self.image_scheduler!r}: known names: "
                + ", ".join(SCHEDULER_NAMES)
            )
        if self.image_idle_offload_s is not None and not self.image_idle_offload_s >= 0:
            raise ValueError(
                f"image_idle_offload_s={self.image_idle_offload_s!r}: must be >= 0 or None"
            )
        if not (isinstance(self.image_max_batch, int) and self.image_max_batch >= 1):
            raise ValueError(f"image_max_batch={self.image_max_batch!r}: must be at least 1")

    @functools.cached_property
    def media_policy(self) -> MediaPolicy:
        """The rules ``load_for_request`` applies to what a request sends."""
        from plait.multimodal.media import MediaPolicy

        return MediaPolicy(
            allowed_local_media_path=self.allowed_local_media_path,
            allowed_media_domains=self.allowed_media_domains,
            fetch_timeout_s=self.media_fetch_timeout_s,
            max_bytes=self.max_media_bytes,
        )
