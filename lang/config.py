"""``pl.global_config``: process-wide settings of the language, by SGLang's names.

SGLang programs and benchmarks set these (``sgl.global_config.verbosity = 2``,
``...enable_parallel_encoding = False``); each one here does what it does there,
where plait has the same thing:

* ``verbosity``: at 2 or more, the final text of every ``run`` is printed.
* ``default_backend``: the backend programs run on when ``run`` gets none (the same
  as ``set_default_backend``; ``None`` until one is set or first needed).
* ``skip_special_tokens_in_output`` / ``spaces_between_special_tokens_in_out``: how
  every ``gen`` detokenizes (the ``skip_special_tokens`` /
  ``spaces_between_special_tokens`` sampling parameters of each request).
* ``enable_precache_with_tracing``: ``run_batch`` traces the program's constant
  prefix and caches it once before the batch.
* ``enable_parallel_encoding``: accepted and kept for SGLang programs; it changes
  nothing here. SGLang uses it to pick a KV-concatenating ``join`` its server never
  had; plait's ``join("concate_and_append")`` always appends the branches' text, and
  the radix cache reuses their KV either way.

Setting a name it does not have raises AttributeError, so a typo is not silently kept.
"""

from __future__ import annotations

from typing import Any


class GlobalConfig:
    __slots__ = (
        "verbosity",
        "skip_special_tokens_in_output",
        "spaces_between_special_tokens_in_out",
        "enable_precache_with_tracing",
        "enable_parallel_encoding",
    )

    def __init__(self) -> None:
        self.verbosity = 0
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True

    @property
    def default_backend(self) -> Any:
        """The backend set with ``set_default_backend`` (None when none is set yet)."""
        from plait import backend

        return backend.current_default_backend()

    @default_backend.setter
    def default_backend(self, value: Any) -> None:
        from plait.backend import set_default_backend

        set_default_backend(value)

    def detokenize_params(self) -> dict[str, Any]:
        """The sampling parameters these settings add to every gen (only where they
        differ from the runtime's defaults, so requests stay as they were)."""
        params: dict[str, Any] = {}
        if not self.skip_special_tokens_in_output:
            params["skip_special_tokens"] = False
        if not self.spaces_between_special_tokens_in_out:
            params["spaces_between_special_tokens"] = False
        return params

    def __repr__(self) -> str:
        fields = ["verbosity", "default_backend", *self.__slots__[1:]]
        return "GlobalConfig(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in fields) + ")"


global_config = GlobalConfig()

__all__ = ["GlobalConfig", "global_config"]
