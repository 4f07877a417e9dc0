"""GenerateInput: one generation request as it enters the engine.

Every caller builds the same object: ``Engine.generate`` / ``async_generate`` from
their keyword arguments, the native ``/generate`` route from its body, the OpenAI
routes from theirs, the DSL's engine backend from a ``gen`` or ``select``::

    inp = GenerateInput(prompt="The capital of France is", sampling_params={"max_new_tokens": 8})
    engine.generate(inp)

``GenerateInput.check`` is the one place its fields are validated: it turns the
input into one :class:`PromptInput` per prompt (token ids, verified sampling
params, rid), or raises :class:`RequestError` naming the field and the value.
What it needs to know of the model comes in :class:`InputLimits`. It imports no
torch: the engine turns each PromptInput into scheduler requests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plait.runtime.errors import RequestError
from plait.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from plait.multimodal.vision import ProcessedPrompt

# The reason a text-only model gives for images (the DSL's image() says the same).
TEXT_ONLY = "this model is text-only; images need a vision-language model"


@dataclass
class GenerateInput:
    """One request: a prompt (text) or token ids, single or a batch, and its options.

    The first nine fields are ``Engine.generate``'s arguments, in its order.
    ``sampling_params`` is a dict, a SamplingParams, or a list of them (one per
    prompt). ``images`` holds a list of image data per prompt; a text-only model
    refuses any. ``token_ids_logprob`` (SGLang's logprobs of chosen token ids) is
    named so that asking for it is refused, never ignored.
    """

    prompt: str | list[str] | None = None
    sampling_params: dict | SamplingParams | list | None = None
    input_ids: list[int] | list[list[int]] | None = None
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    images: list[list[Any]] | None = None
    # A prefix-cache namespace (SGLang's extra_key, vLLM's cache_salt): requests share
    # cached prefixes only with requests of the same key. One, or one per prompt.
    extra_key: str | list[str | None] | None = None

    def check(
        self,
        encode: Callable[[str], list[int]],
        limits: InputLimits,
        process_images: Callable[[str, list[Any]], ProcessedPrompt] | None = None,
    ) -> tuple[list[PromptInput], bool]:
        """The prompts of this input, validated, and whether it was a single prompt
        (not a batch). ``encode`` tokenizes a text prompt; ``process_images`` (a
        vision-language model's processor) turns a text prompt and its images into
        ids with the image placeholders expanded, and the images' items."""
        id_lists, single = self._token_ids(encode)
        params_list = self._params_list(len(id_lists))
        rids = self._rids(len(id_lists))
        keys = self._extra_keys(len(id_lists))
        self._check_logprob_options(limits)
        images = self._images(len(id_lists), limits)
        items: list[list[Any]] = [[] for _ in id_lists]
        mrope: list[tuple[Any, int]] = [(None, 0) for _ in id_lists]  # M-RoPE positions, delta
        for i, imgs in enumerate(images):
            text = self._prompt_text(i, single)
            _check_placeholders(text, imgs, i if not single else None, limits)
            if imgs and process_images is not None:
                if text is None:
                    raise RequestError(
                        "input_ids", "<token ids>", "images need the prompt as text, not input_ids"
                    )
                processed = process_images(text, imgs)
                id_lists[i], items[i] = processed.input_ids, processed.images
                mrope[i] = (processed.mrope_positions, processed.mrope_delta)
        prompts = []
        for i, (ids, raw) in enumerate(zip(id_lists, params_list)):
            params = SamplingParams.from_dict(raw).verify(limits.vocab_size)
            _check_ids(ids, i if not single else None, limits)
            # Past the context, max_new_tokens is capped (and the result says so in
            # meta_info["capped_max_new_tokens"]) rather than refused.
            requested = params.max_new_tokens
            params.max_new_tokens = min(requested, limits.context_len - len(ids))
            capped = params.max_new_tokens if params.max_new_tokens < requested else None
            if len(ids) + params.max_new_tokens > limits.max_total_tokens:
                raise RequestError(
                    "max_new_tokens",
                    params.max_new_tokens,
                    f"prompt ({len(ids)} tokens) + max_new_tokens needs more KV slots than the pool "
                    f"holds ({limits.max_total_tokens}); raise max_total_tokens or kv_cache_memory_gb",
                )
            if self.stream and (params.n > 1 or len(id_lists) > 1):
                raise RequestError("stream", self.stream, "streaming takes one prompt with n=1")
            from plait.runtime.constrained.spec import GrammarSpec

            prompts.append(
                PromptInput(
                    input_ids=ids,
                    params=params,
                    grammar=GrammarSpec.from_params(params),  # malformed constraints raise here
                    rid=rids[i],
                    given_rid=self.rid if isinstance(self.rid, str) else rids[i] or None,
                    capped_max_new_tokens=capped,
                    images=images[i],
                    image_items=items[i],
                    mrope_positions=mrope[i][0],
                    mrope_delta=mrope[i][1],
                    cache_namespace=keys[i],
                )
            )
        return prompts, single

    def _prompt_text(self, i: int, single: bool) -> str | None:
        """Prompt ``i`` as text (None when given as token ids)."""
        if self.prompt is None:
            return None
        return self.prompt if single else self.prompt[i]

    def _token_ids(self, encode: Callable[[str], list[int]]) -> tuple[list[list[int]], bool]:
        prompt, input_ids = self.prompt, self.input_ids
        if (prompt is None) == (input_ids is None):
            raise RequestError("prompt", prompt, "give exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            for i, p in enumerate(prompts):
                name = "prompt" if single else f"prompt[{i}]"
                if not isinstance(p, str):
                    raise RequestError(name, p, "must be a string")
                check_unicode(name, p)
            id_lists = [encode(p) for p in prompts]
        else:
            single = not input_ids or isinstance(input_ids[0], int)
            id_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        if not id_lists:
            raise RequestError("prompt", prompt if prompt is not None else input_ids, "empty batch")
        return id_lists, single

    def _params_list(self, n: int) -> list[Any]:
        sp = self.sampling_params
        params_list = sp if isinstance(sp, list) else [sp] * n
        if len(params_list) != n:
            raise RequestError("sampling_params", sp, f"expected {n} entries")
        return params_list

    def _rids(self, n: int) -> list[str | None]:
        rid = self.rid
        if isinstance(rid, list):
            rids = rid
        elif rid is not None and n > 1:  # one id for a batch: one per prompt
            rids = [f"{rid}-{i}" for i in range(n)]
        else:
            rids = [rid] * n
        if len(rids) != n:
            raise RequestError("rid", rid, f"{len(rids)} rids for {n} prompts")
        given = [r for r in rids if r is not None]
        if len(set(given)) != len(given):
            raise RequestError("rid", rid, "rids must be unique")
        return rids

    def _extra_keys(self, n: int) -> list[str | None]:
        key = self.extra_key
        keys = key if isinstance(key, list) else [key] * n
        ok = len(keys) == n and all(k is None or (isinstance(k, str) and k) for k in keys)
        if not ok:
            raise RequestError(
                "extra_key", key, f"a non-empty string, or a list of {n} (one per prompt)"
            )
        return keys

    def _check_logprob_options(self, limits: InputLimits) -> None:
        top = self.top_logprobs_num
        cap = min(limits.vocab_size, limits.max_top_logprobs_num)
        if top is not None and (
            not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= cap
        ):
            raise RequestError(
                "top_logprobs_num", top, f"must be an integer in [0, {cap}] (max_top_logprobs_num)"
            )
        start = self.logprob_start_len
        if start is not None and not isinstance(start, int):
            raise RequestError("logprob_start_len", start, "must be an integer")
        if self.token_ids_logprob is not None:
            raise RequestError(
                "token_ids_logprob",
                self.token_ids_logprob,
                "logprobs of chosen token ids are not supported; use top_logprobs_num",
            )

    def _images(self, n: int, limits: InputLimits) -> list[list[Any]]:
        """The image data of each prompt (none on a text-only model)."""
        if self.images is None:
            return [[] for _ in range(n)]
        shape = f"expected a list of {n} image lists (one per prompt)"
        if not isinstance(self.images, list):
            raise RequestError("images", self.images, shape)
        if any(self.images) and not limits.supports_images:
            raise RequestError("images", limits.model_name, TEXT_ONLY)
        if len(self.images) != n:
            raise RequestError("images", self.images, shape)
        per_prompt = [[] if imgs is None else imgs for imgs in self.images]
        for i, imgs in enumerate(per_prompt):
            if not isinstance(imgs, list):
                raise RequestError(f"images[{i}]", imgs, "must be a list of image data")
        return per_prompt


@dataclass(frozen=True)
class InputLimits:
    """What checking an input needs to know of the model and the engine."""

    vocab_size: int
    context_len: int
    max_total_tokens: int
    max_top_logprobs_num: int
    model_name: str = "model"
    supports_images: bool = False
    # What a prompt writes where an image goes (a vision-language model's placeholder).
    image_token: str | None = None


@dataclass
class PromptInput:
    """One prompt of a GenerateInput, checked: the engine makes ``params.n`` requests
    of it. ``rid`` is None when the caller gave none (the engine draws one);
    ``given_rid`` is the rid the caller knows the request by (``x`` for the prompts
    ``x-0``, ``x-1`` of a batch)."""

    input_ids: list[int]
    params: SamplingParams
    grammar: Any  # GrammarSpec | None
    rid: str | None
    given_rid: str | None
    capped_max_new_tokens: int | None
    images: list[Any]
    image_items: list[Any] = field(default_factory=list)  # ImageItems, after processing
    mrope_positions: Any = None  # M-RoPE models: the prompt's [3, T] positions
    mrope_delta: int = 0
    cache_namespace: str | None = None  # extra_key: the prefix cache's namespace


def image_data_lists(image_data: Any, prompt: Any, input_ids: Any) -> list[list[Any]] | None:
    """SGLang's ``image_data`` shapes as one list of images per prompt: for one prompt,
    an image or a list of images; for a batch, a list with one entry per prompt (an
    image, a list of images, or None)."""
    if image_data is None:
        return None
    if prompt is not None:
        single = isinstance(prompt, str)
    else:
        single = not input_ids or isinstance(input_ids[0], int)
    if single:
        return [list(image_data) if isinstance(image_data, list) else [image_data]]
    if not isinstance(image_data, list):
        raise RequestError(
            "image_data", type(image_data).__name__, "a batch takes a list, one entry per prompt"
        )
    return [
        [] if entry is None else list(entry) if isinstance(entry, list) else [entry]
        for entry in image_data
    ]


def _check_placeholders(
    text: str | None, images: list[Any], index: int | None, limits: InputLimits
) -> None:
    """A text prompt holds one image placeholder per image."""
    token = limits.image_token
    if token is None or text is None:
        return
    found = text.count(token)
    if found != len(images):
        name = "images" if index is None else f"images[{index}]"
        raise RequestError(
            name,
            f"{len(images)} images",
            f"the prompt has {found} {token!r} placeholders for {len(images)} images; "
            f"write {token!r} where each image goes",
        )


def check_unicode(name: str, text: str) -> None:
    """Text must be valid Unicode: a lone surrogate (JSON's "\\ud800") cannot be encoded,
    tokenized or sent back."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            name,
            text[max(0, e.start - 10) : e.end + 10],
            f"contains a lone surrogate {text[e.start]!a} at character {e.start}, "
            "which is not valid Unicode",
        ) from None


def _check_ids(ids: list[int], index: int | None, limits: InputLimits) -> None:
    name = "input_ids" if index is None else f"input_ids[{index}]"
    if not ids:
        raise RequestError(name, ids, "the prompt has no tokens")
    vocab = limits.vocab_size
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise RequestError(name, bad[:5], f"token ids must be integers in [0, {vocab})")
    if len(ids) >= limits.context_len:
        raise RequestError(
            name,
            f"<{len(ids)} tokens>",
            f"the prompt is longer than the context length ({limits.context_len} tokens)",
        )
