"""``sglang.lang.global_config``: the ``GlobalConfig`` instance (plait.config)."""

from __future__ import annotations

from plait.config import GlobalConfig, global_config

__all__ = ["GlobalConfig", "global_config"]
