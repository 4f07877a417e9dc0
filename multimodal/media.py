"""Images that arrive over HTTP: what a request may make the server read.

In-process callers (the DSL, ``Engine``) load images with
``plait.multimodal.image.load_image`` and may read any path. A server must not
let a client read its files or make it fetch without bound, so the routes load
what a request names with ``load_for_request(source, policy)`` instead:

==========================  ======================================================
source                      rule
==========================  ======================================================
``data:...;base64,...``     always accepted
plain base64 text           always accepted
``http://``, ``https://``   fetched with ``fetch_timeout_s`` (a deadline for the
                            whole fetch) and at most ``max_bytes``; with
                            ``allowed_media_domains``, only those exact host
                            names (redirects are checked hop by hop)
a plain path                only when the server has ``allowed_local_media_path``
                            and the path, symlinks and ``..`` resolved, lies
                            inside it (a relative path is taken from there)
``file://`` and any other   refused (a URL never reaches the file system: local
scheme                      files come only as plain paths, under the rule above)
==========================  ======================================================

Every refusal is an ``ImageError`` (a ``ValueError``) naming the source, shortened,
and the reason; decoding (truncated files, decompression bombs) is
``load_image_bytes``'s, the one decoder. Fetching is blocking: an async route runs
``load_for_request`` in a worker thread. Without a domain list any host is
fetched, local addresses included, as vLLM does; the list is how a deployment
keeps clients off its internal network.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from plait.multimodal.image import (
    ImageError,
    LoadedImage,
    load_image_bytes,
    shorten,
    strict_base64,
)

DEFAULT_FETCH_TIMEOUT_S = 5.0
DEFAULT_MAX_BYTES = 20 * 2**20
_CHUNK = 64 * 2**10
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may make the server read. The defaults read no local file and
    fetch from any host."""

    allowed_local_media_path: Path | None = None
    allowed_media_domains: Sequence[str] | None = None
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    max_bytes: int = DEFAULT_MAX_BYTES
    # Derived in __post_init__: the allowed directory with its symlinks resolved, and
    # the host names lower-cased without a trailing dot.
    _root: Path | None = field(default=None, init=False, repr=False, compare=False)
    _domains: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"fetch_timeout_s={self.fetch_timeout_s!r}: must be > 0")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes={self.max_bytes!r}: must be >= 1")
        if self.allowed_local_media_path is not None:
            root = Path(self.allowed_local_media_path).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(
                    f"allowed_local_media_path={str(self.allowed_local_media_path)!r}: "
                    "not a directory"
                )
            object.__setattr__(self, "_root", root)
        if self.allowed_media_domains is not None:
            if isinstance(self.allowed_media_domains, str):
                raise ValueError(
                    f"allowed_media_domains={self.allowed_media_domains!r}: "
                    "must be a list of host names, not one string"
                )
            domains = frozenset(_host(d) for d in self.allowed_media_domains)
            bad = sorted(d for d in domains if not d or "/" in d or ":" in d)
            if bad:
                raise ValueError(
                    f"allowed_media_domains: {bad[0]!r} is not a host name "
                    "(give names like 'example.com', without scheme or port)"
                )
            object.__setattr__(self, "allowed_media_domains", tuple(sorted(domains)))
            object.__setattr__(self, "_domains", domains)


def load_for_request(source: object, policy: MediaPolicy) -> LoadedImage:
    """Load the image a request names (a string: data URL, base64, URL or path) under
    ``policy``; raises ImageError naming the source and the reason."""
    if not isinstance(source, str):
        raise ImageError(
            f"image source of type {type(source).__name__}: a request sends a URL, "
            "a data URL or base64 text"
        )
    text = source.strip()
    if not text:
        raise ImageError("image source '': empty")
    if text.startswith("data:"):
        return load_image_bytes(_data_url(text, policy), text)
    scheme = _SCHEME.match(text)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return load_image_bytes(fetch(text, policy), text)
        raise ImageError(
            f"image source {shorten(text)!r}: the {name!r} scheme is not accepted "
            "(send a data URL, base64 or an http(s) URL; a server started with "
            "--allowed-local-media-path also reads plain paths under it)"
        )
    data = strict_base64(text)
    if data is not None:
        data = _capped(data, text, policy)  # too large is refused, whatever else it is
        try:
            return load_image_bytes(data, text)
        except ImageError:
            if policy._root is None:
                raise
            # Base64-shaped but not an image: it may be a path (letters and slashes).
    return _local(text, text, policy, "not base64 image data, and")


# ---- local files -----------------------------------------------------------------------------


def _local(path: str, shown: str, policy: MediaPolicy, what: str) -> LoadedImage:
    root = policy._root
    if root is None:
        raise ImageError(
            f"image source {shorten(shown)!r}: {what} this server reads no local files "
            "(start it with --allowed-local-media-path DIR to allow files under DIR)"
        )
    # Resolve first (symlinks and '..'), check the place, and only then touch the file:
    # whether a path outside the directory exists is not the client's to learn.
    try:
        target = Path(path).expanduser()
        if not target.is_absolute():
            target = root / target
        target = target.resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop, ...
        # (no detail: the error would show where the server's files are)
        raise ImageError(f"image source {shorten(shown)!r}: not a usable path") from None
    if not target.is_relative_to(root):
        raise ImageError(
            f"image source {shorten(shown)!r}: outside the allowed local media directory"
        )
    try:
        with open(target, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise ImageError(f"image source {shorten(shown)!r}: cannot read ({e.strerror})") from None
    return load_image_bytes(_capped(data, shown, policy), shown)


# ---- encoded data ----------------------------------------------------------------------------


def _data_url(text: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = text.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageError(
            f"image source {shorten(text)!r}: a data URL must be 'data:image/...;base64,...'"
        )
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image source {shorten(text)!r}: bad base64 ({e})") from None
    return _capped(data, text, policy)


def _capped(data: bytes, shown: str, policy: MediaPolicy) -> bytes:
    if len(data) > policy.max_bytes:
        raise ImageError(
            f"image source {shorten(shown)!r}: more than {policy.max_bytes} bytes "
            "(the server's media byte limit)"
        )
    return data


# ---- http(s) ---------------------------------------------------------------------------------


def fetch(url: str, policy: MediaPolicy) -> bytes:
    """GET ``url`` under ``policy``: allowed hosts only (each redirect too), done within
    ``fetch_timeout_s`` in all, and stopped as soon as it passes ``max_bytes``."""
    _check_url(url, url, policy)
    deadline = time.monotonic() + policy.fetch_timeout_s
    opener = urllib.request.build_opener(_CheckedRedirects(url, policy))
    request = urllib.request.Request(url, headers={"User-Agent": "plait"})
    try:
        with opener.open(request, timeout=policy.fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise ImageError(
                    f"image source {shorten(url)!r}: {declared} bytes, more than the "
                    f"server's media byte limit of {policy.max_bytes}"
                )
            return _read_capped(response, url, policy, deadline)
    except urllib.error.HTTPError as e:
        raise ImageError(f"image source {shorten(url)!r}: HTTP {e.code} {e.reason}") from None
    except TimeoutError:
        raise _timed_out(url, policy) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise _timed_out(url, policy) from None
        raise ImageError(f"image source {shorten(url)!r}: unreachable ({e.reason})") from None
    except (OSError, ValueError) as e:  # connection reset, a malformed response, ...
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"image source {shorten(url)!r}: fetch failed ({e})") from None


def _read_capped(response, url: str, policy: MediaPolicy, deadline: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _timed_out(url, policy)
        chunk = response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > policy.max_bytes:
            raise ImageError(
                f"image source {shorten(url)!r}: more than the server's media byte limit "
                f"of {policy.max_bytes} bytes (stopped reading)"
            )
        chunks.append(chunk)


def _timed_out(url: str, policy: MediaPolicy) -> ImageError:
    return ImageError(
        f"image source {shorten(url)!r}: timed out (the server's media fetch timeout is "
        f"{policy.fetch_timeout_s:g}s)"
    )


def _host(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _check_url(url: str, shown: str, policy: MediaPolicy) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ImageError(
            f"image source {shorten(shown)!r}: {shorten(url)!r} is not an http(s) URL; refused"
        )
    host = _host(parts.hostname or "")
    if not host:
        raise ImageError(f"image source {shorten(shown)!r}: a URL without a host")
    if policy._domains is not None and host not in policy._domains:
        where = "" if url == shown else f" (redirected to {host!r})"
        raise ImageError(
            f"image source {shorten(shown)!r}{where}: host {host!r} is not in the "
            "server's allowed media domains"
        )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the policy would fetch itself."""

    def __init__(self, original: str, policy: MediaPolicy):
        self.original = original
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url(newurl, self.original, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def describe(policy: MediaPolicy) -> str:
    """One line for the server's start-up log."""
    local = str(policy._root) if policy._root else "none"
    domains = ", ".join(sorted(policy._domains)) if policy._domains is not None else "any"
    return (
        f"media: local files under {local}; URL hosts {domains}; fetch timeout "
        f"{policy.fetch_timeout_s:g}s; at most {policy.max_bytes} bytes"
    )
