"""Images as the runtime receives them: loaded from any accepted form and
identified by content.

Accepted sources: a file path (str or ``os.PathLike``), raw bytes, a base64
string or ``data:image/...;base64,`` URL, or a PIL image. The content hash
(SHA-256 of the decoded RGB pixels and the size) is what the prefix cache and
the vision-embedding cache will key on, so the same picture sent as a path or
as base64 is the same image.

Every encoded image (file, bytes, base64) is decoded in one place,
``load_image_bytes``, which refuses what PIL cannot read, truncated files and
decompression bombs: an image whose header claims more pixels than PIL's
``Image.MAX_IMAGE_PIXELS`` (read at each call, so an application that changes
it is obeyed; ``None`` turns the check off) is refused before its pixels are
decoded. An HTTP server does not call ``load_image`` on what clients send: it
calls ``plait.multimodal.media.load_for_request``, which adds the server's rules
(no local files, URLs with a timeout and a byte limit).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from dataclasses import dataclass
from typing import Any

from PIL import Image as PILImage
from PIL import UnidentifiedImageError


class ImageError(ValueError):
    """An image source that cannot be loaded; the message names the source."""


@dataclass(frozen=True, eq=False)
class LoadedImage:
    image: PILImage.Image  # RGB
    content_hash: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def to_data_url(self, fmt: str = "PNG") -> str:
        buf = io.BytesIO()
        self.image.save(buf, format=fmt)
        mime = "jpeg" if fmt.upper() == "JPEG" else fmt.lower()
        return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def load_image(source: Any) -> LoadedImage:
    """Load ``source`` (path, bytes, base64 / data URL, PIL image) as RGB."""
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, PILImage.Image):
        image = source
    elif isinstance(source, (bytes, bytearray)):
        return load_image_bytes(bytes(source), "<bytes>")
    elif isinstance(source, (str, os.PathLike)):
        image = _from_string(os.fspath(source))
    else:
        raise ImageError(
            f"image source of type {type(source).__name__}: expected a path, bytes, "
            "a base64 string or data URL, or a PIL image"
        )
    return _loaded(image)


def load_image_bytes(data: bytes, shown: str) -> LoadedImage:
    """Decode an encoded image (PNG, JPEG, ...); ``shown`` names its source in errors."""
    return _loaded(_open(data, shown))


def shorten(source: str, limit: int = 80) -> str:
    """``source`` as an error message shows it: a data URL by its header, long text cut."""
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        return f"{header[:limit]},...({len(payload)} chars)"
    return source if len(source) <= limit else source[: limit - 3] + "..."


def _loaded(image: PILImage.Image) -> LoadedImage:
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode() + rgb.tobytes())
    return LoadedImage(rgb, digest.hexdigest())


def _from_string(text: str) -> PILImage.Image:
    if text.startswith("data:"):
        _, _, payload = text.partition(",")
        return _open(_b64(payload, text), text)
    if os.path.exists(text):
        with open(text, "rb") as f:
            return _open(f.read(), text)
    data = strict_base64(text)
    if data is None:
        raise ImageError(f"image source {shorten(text)!r}: no such file, and not base64 image data")
    try:
        return _open(data, text)
    except ImageError as e:  # a missing path can be base64-shaped too: say both
        reason = str(e).partition(": ")[2]
        raise ImageError(
            f"image source {shorten(text)!r}: no such file, and as base64: {reason}"
        ) from None


def strict_base64(text: str) -> bytes | None:
    """The bytes of ``text`` if it is base64 and nothing else (line breaks allowed)."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(payload: str, shown: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image source {shorten(shown)!r}: bad base64 ({e})") from None


def _open(data: bytes, shown: str) -> PILImage.Image:
    """Decode ``data``: the header first, then (if its size is within the pixel limit)
    the pixels. PIL raises DecompressionBombError itself past twice its limit, and only
    warns between once and twice; here both are an ImageError."""
    try:
        image = PILImage.open(io.BytesIO(data))
        _check_pixels(image.size, shown)
        image.load()
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        # (the warning arrives as an exception where warnings are errors: python -W error)
        raise ImageError(
            f"image source {shorten(shown)!r}: refused as a possible decompression bomb ({e})"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image source {shorten(shown)!r}: not a readable image (not a format PIL knows)"
        ) from None
    except OSError as e:  # a truncated or corrupt file
        raise ImageError(f"image source {shorten(shown)!r}: not a readable image ({e})") from None
    return image


def _check_pixels(size: tuple[int, int], shown: str) -> None:
    limit = PILImage.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        raise ImageError(
            f"image source {shorten(shown)!r}: refused as a possible decompression bomb "
            f"({size[0]}x{size[1]} is {size[0] * size[1]} pixels, more than the limit of "
            f"{limit}, PIL.Image.MAX_IMAGE_PIXELS)"
        )
