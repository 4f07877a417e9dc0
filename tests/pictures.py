"""Pictures for the image tests: seeded noise images and their encodings, a
decompression bomb, a picture server on 127.0.0.1, and the tiny Idefics3's prompt
layout (SmolVLM's)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic noise picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width x height`` pixels, with almost no data: a
    few hundred bytes that would decode to tens of gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ask(*parts: str) -> str:
    """A SmolVLM-style user turn (``<image>`` where each image goes) and the answer cue."""
    return "<|im_start|>User:" + "".join(parts) + "<end_of_utterance>\nAssistant:"


WIDE, TALL, SQUARE = picture(64, 48, 1), picture(40, 80, 2), picture(30, 30, 3)


@contextlib.contextmanager
def picture_server(
    routes: dict[str, bytes], delays: dict[str, float] | None = None
) -> Iterator[str]:
    """Serve ``routes`` (path -> PNG bytes; any other path is a 404) on 127.0.0.1 and
    yield the base URL; a path in ``delays`` answers after that many seconds."""
    delays = delays or {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                time.sleep(delays.get(self.path, 0))
                body = routes.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
