"""What an HTTP request may make the server read (plait.multimodal.media): data URLs
and base64 always; local files only inside the allowed directory; http(s) URLs
with a timeout, a byte limit and an optional host list, against a real server on
127.0.0.1; other schemes never. Bad bytes, truncated files and decompression
bombs are refused by the one decoder, in process too."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import re
import threading
import time

import pytest
from http_server import free_port
from pictures import bomb_png, data_url
from PIL import Image

from plait.multimodal.image import ImageError, load_image, load_image_bytes
from plait.multimodal.media import MediaPolicy, describe, load_for_request
from plait.runtime import cli
from plait.runtime.server.config import ServerConfig


def png(color=(200, 30, 60), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


EXPECTED = load_image(png()).content_hash


# ---- a local HTTP server ------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]  # set per server

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.hits.append(self.path)
        port = self.server.server_address[1]
        # The client may stop reading early, as it should past a limit.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._route(port)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length=True):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, port: int) -> None:
        path = self.path
        if path == "/cat.png":
            self._send(200, png(), {"Content-Type": "image/png"})
        elif path == "/truncated.png":
            self._send(200, png(size=(64, 64))[:-40])
        elif path == "/bomb.png":
            self._send(200, bomb_png())
        elif path == "/declared-big":
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 2**20))
            self.end_headers()
        elif path == "/streamed-big":  # no Content-Length: the body ends when we close
            self.send_response(200)
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 2**16)
        elif path == "/slow":
            time.sleep(3)
            self._send(200, png())
        elif path == "/drip":  # every read is quick, the whole never ends in time
            self.send_response(200)
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)
        elif path == "/to-localhost":
            self._send(302, headers={"Location": f"http://localhost:{port}/cat.png"})
        elif path == "/to-same-host":
            self._send(302, headers={"Location": "/cat.png"})
        elif path == "/to-ftp":
            self._send(302, headers={"Location": "ftp://127.0.0.1/cat.png"})
        else:
            self._send(404, b"no")


@pytest.fixture(scope="module")
def web():
    """(base URL, list of paths requested) of a server on 127.0.0.1."""
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


# Fetches go straight to 127.0.0.1, whatever proxy the environment names.
pytestmark = pytest.mark.usefixtures("no_proxy")


# ---- encoded data --------------------------------------------------------------------------


def test_data_urls_and_base64_are_always_accepted():
    policy = MediaPolicy()
    assert load_for_request(data_url(png()), policy).content_hash == EXPECTED
    assert load_for_request(base64.b64encode(png()).decode(), policy).content_hash == EXPECTED
    wrapped = base64.encodebytes(png()).decode()  # MIME line breaks
    assert load_for_request(wrapped, policy).content_hash == EXPECTED


def test_bytes_that_are_not_an_image_are_refused_naming_the_source():
    with pytest.raises(ImageError, match=r"'data:image/png;base64,...\(\d+ chars\)'.*not a read"):
        load_for_request(data_url(b"hello, not a png at all"), MediaPolicy())
    with pytest.raises(ImageError, match="must be 'data:image/...;base64"):
        load_for_request("data:image/png,rawbytes", MediaPolicy())


def test_a_truncated_image_is_refused():
    cut = png(size=(64, 64))[:-40]
    with pytest.raises(ImageError, match="not a readable image"):
        load_for_request(data_url(cut), MediaPolicy())
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(cut)  # in process too


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = bomb_png()
    assert len(bomb) < 200
    with pytest.raises(ImageError, match=r"decompression bomb .*10000000000 pixels"):
        load_for_request(data_url(bomb), MediaPolicy())
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb)


def test_pils_pixel_limit_is_the_limit_below_and_above_twice_it(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # 144 pixels: PIL itself only warns (between once and twice its limit); refused here.
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(ImageError, match=r"12x12 is 144 pixels, more than the limit of 100"),
    ):
        load_image_bytes(png(size=(12, 12)), "small")
    # 400 pixels: PIL raises DecompressionBombError, which becomes an ImageError.
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image_bytes(png(size=(20, 20)), "larger")
    assert load_image_bytes(png(size=(10, 10)), "fits").size == (10, 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the application turned it off
    assert load_image_bytes(png(size=(20, 20)), "unchecked").size == (20, 20)


def test_in_process_base64_of_any_format_loads_and_says_why_not():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buf, format="JPEG")
    jpeg = base64.b64encode(buf.getvalue()).decode()
    assert jpeg.startswith("/9j/")  # base64 JPEGs look like absolute paths
    assert load_image(jpeg).size == (8, 8)
    assert load_for_request(jpeg, MediaPolicy()).size == (8, 8)
    with pytest.raises(ImageError, match="no such file, and as base64: refused as a possible"):
        load_image(base64.b64encode(bomb_png()).decode())
    with pytest.raises(ImageError, match="no such file, and not base64 image data"):
        load_image("/no/such/picture.png")


def test_the_byte_limit_applies_to_encoded_data_too():
    small = MediaPolicy(max_bytes=100)
    with pytest.raises(ImageError, match="more than 100 bytes"):
        load_for_request(data_url(png(size=(64, 64))), small)


# ---- local files ---------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path):
    """tmp/allowed/cat.png (allowed) and tmp/secret.png (outside)."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / "cat.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png((1, 2, 3)))
    return allowed


def test_no_local_file_is_read_without_an_allowed_directory(media):
    path = str(media / "sub" / "cat.png")
    with pytest.raises(ImageError, match="reads no local files.*--allowed-local-media-path"):
        load_for_request(path, MediaPolicy())
    with pytest.raises(ImageError, match="'file' scheme is not accepted"):
        load_for_request("file://" + path, MediaPolicy())


def test_a_file_url_is_refused_even_inside_the_allowed_directory(media):
    policy = MediaPolicy(allowed_local_media_path=media)
    with pytest.raises(ImageError, match="'file' scheme is not accepted"):
        load_for_request("file://" + str(media / "sub" / "cat.png"), policy)


def test_a_file_inside_the_allowed_directory_is_read(media):
    policy = MediaPolicy(allowed_local_media_path=media)
    for source in (
        str(media / "sub" / "cat.png"),
        "sub/cat.png",  # relative to the allowed directory
        str(media / "sub" / ".." / "sub" / "cat.png"),  # '..' that stays inside
    ):
        assert load_for_request(source, policy).content_hash == EXPECTED, source


def test_a_file_outside_the_allowed_directory_is_refused(media):
    policy = MediaPolicy(allowed_local_media_path=media)
    secret = media.parent / "secret.png"
    for source in (
        str(secret),
        "../secret.png",
        str(media / ".." / "secret.png"),
        "/etc/passwd",
    ):
        with pytest.raises(ImageError, match="outside the allowed local media directory"):
            load_for_request(source, policy)


def test_a_missing_file_outside_says_outside_not_missing(media):
    """Whether a path outside the directory exists is not the client's to learn."""
    policy = MediaPolicy(allowed_local_media_path=media)
    with pytest.raises(ImageError, match="outside the allowed"):
        load_for_request(str(media.parent / "no-such.png"), policy)
    with pytest.raises(ImageError, match="cannot read"):
        load_for_request(str(media / "no-such.png"), policy)


def test_a_symlink_that_escapes_the_directory_is_refused(media):
    (media / "escape.png").symlink_to(media.parent / "secret.png")
    (media / "escape-dir").symlink_to(media.parent)
    (media / "inner.png").symlink_to(media / "sub" / "cat.png")
    policy = MediaPolicy(allowed_local_media_path=media)
    for source in ("escape.png", "escape-dir/secret.png"):
        with pytest.raises(ImageError, match="outside the allowed"):
            load_for_request(source, policy)
    assert load_for_request("inner.png", policy).content_hash == EXPECTED


def test_an_allowed_directory_reached_through_a_symlink_still_works(media, tmp_path):
    link = tmp_path / "link-to-allowed"
    link.symlink_to(media)
    policy = MediaPolicy(allowed_local_media_path=link)
    assert load_for_request(str(media / "sub" / "cat.png"), policy).content_hash == EXPECTED
    assert load_for_request(str(link / "sub" / "cat.png"), policy).content_hash == EXPECTED


def test_a_path_that_cannot_be_a_path_is_an_image_error(media):
    policy = MediaPolicy(allowed_local_media_path=media)
    with pytest.raises(ImageError, match="not a usable path"):
        load_for_request("sub/cat\0.png", policy)
    (media / "loop").symlink_to(media / "loop")
    with pytest.raises(ImageError, match="not a usable path$") as err:
        load_for_request("loop", policy)
    assert str(media) not in str(err.value)  # the server's directories stay private


def test_a_local_file_over_the_byte_limit_is_refused(media):
    policy = MediaPolicy(allowed_local_media_path=media, max_bytes=20)
    with pytest.raises(ImageError, match="more than 20 bytes"):
        load_for_request("sub/cat.png", policy)


@pytest.mark.parametrize(
    "source",
    [
        "ftp://127.0.0.1/cat.png",
        "gopher://127.0.0.1/cat.png",
        "s3://bucket/cat.png",
        "javascript:alert(1)",
        "FILE://etc/passwd",
        "file://otherhost/etc/passwd",
        "file:///etc/passwd",
    ],
)
def test_other_schemes_are_refused(source, media):
    """file:// too, even inside the allowed directory: local files come as plain paths."""
    policy = MediaPolicy(allowed_local_media_path=media)
    with pytest.raises(ImageError, match="scheme is not accepted"):
        load_for_request(source, policy)


def test_a_policy_checks_its_own_settings(tmp_path):
    with pytest.raises(ValueError, match="allowed_local_media_path=.*not a directory"):
        MediaPolicy(allowed_local_media_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="'https://a.com' is not a host name"):
        MediaPolicy(allowed_media_domains=["https://a.com"])
    with pytest.raises(ValueError, match="not one string"):
        MediaPolicy(allowed_media_domains="a.com")
    with pytest.raises(ValueError, match="fetch_timeout_s=0: must be > 0"):
        MediaPolicy(fetch_timeout_s=0)
    with pytest.raises(ValueError, match="max_bytes=0: must be >= 1"):
        MediaPolicy(max_bytes=0)
    assert MediaPolicy(allowed_media_domains=["Example.COM."]).allowed_media_domains == (
        "example.com",
    )


# ---- http(s) -------------------------------------------------------------------------------


def test_an_http_url_is_fetched(web):
    base, _ = web
    assert load_for_request(f"{base}/cat.png", MediaPolicy()).content_hash == EXPECTED
    allowed = MediaPolicy(allowed_media_domains=["127.0.0.1"])
    assert load_for_request(f"{base}/cat.png", allowed).content_hash == EXPECTED


def test_a_host_outside_the_domain_list_is_not_contacted(web):
    base, hits = web
    before = len(hits)
    policy = MediaPolicy(allowed_media_domains=["images.example.com"])
    with pytest.raises(ImageError, match="host '127.0.0.1' is not in the server's allowed"):
        load_for_request(f"{base}/cat.png", policy)
    assert len(hits) == before


def test_redirects_are_checked_hop_by_hop(web):
    base, _ = web
    only_ip = MediaPolicy(allowed_media_domains=["127.0.0.1"])
    assert load_for_request(f"{base}/to-same-host", only_ip).content_hash == EXPECTED
    with pytest.raises(ImageError, match="redirected to 'localhost'.*not in the server's"):
        load_for_request(f"{base}/to-localhost", only_ip)
    with pytest.raises(ImageError, match="not an http"):
        load_for_request(f"{base}/to-ftp", MediaPolicy())


def test_a_declared_size_over_the_limit_is_refused_before_reading(web):
    base, _ = web
    with pytest.raises(ImageError, match=r"52428800 bytes, more than .* limit of 1000"):
        load_for_request(f"{base}/declared-big", MediaPolicy(max_bytes=1000))


def test_a_streamed_body_is_cut_off_past_the_limit(web):
    base, _ = web
    with pytest.raises(ImageError, match="byte limit of 100000 bytes \\(stopped reading\\)"):
        load_for_request(f"{base}/streamed-big", MediaPolicy(max_bytes=100_000))


def test_a_slow_server_times_out(web):
    base, _ = web
    policy = MediaPolicy(fetch_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out .*timeout is 0.5s"):
        load_for_request(f"{base}/slow", policy)
    assert time.monotonic() - started < 2


def test_the_timeout_bounds_the_whole_fetch_not_each_read(web):
    base, _ = web
    policy = MediaPolicy(fetch_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        load_for_request(f"{base}/drip", policy)  # a byte every 50 ms for 5 s
    assert time.monotonic() - started < 2


def test_http_errors_and_bad_bodies_are_image_errors(web):
    base, _ = web
    with pytest.raises(ImageError, match="HTTP 404"):
        load_for_request(f"{base}/missing.png", MediaPolicy())
    with pytest.raises(ImageError, match="not a readable image"):
        load_for_request(f"{base}/truncated.png", MediaPolicy())
    with pytest.raises(ImageError, match="decompression bomb"):
        load_for_request(f"{base}/bomb.png", MediaPolicy())


def test_an_unreachable_host_is_an_image_error():
    with pytest.raises(ImageError, match="unreachable"):
        load_for_request(f"http://127.0.0.1:{free_port()}/cat.png", MediaPolicy())


def test_a_long_source_is_shortened_in_the_message(web):
    base, _ = web
    long_url = f"{base}/{'x' * 500}.png"
    with pytest.raises(ImageError) as err:
        load_for_request(long_url, MediaPolicy())
    assert len(str(err.value)) < 200 and "..." in str(err.value)


# ---- the server's settings and flags -------------------------------------------------------


def test_server_config_builds_the_policy_and_checks_it_at_once(media):
    config = ServerConfig(
        allowed_local_media_path=str(media),
        allowed_media_domains=("images.example.com",),
        media_fetch_timeout_s=2.0,
        max_media_bytes=1234,
    )
    policy = config.media_policy
    assert policy.allowed_media_domains == ("images.example.com",)
    assert (policy.fetch_timeout_s, policy.max_bytes) == (2.0, 1234)
    assert load_for_request("sub/cat.png", policy).content_hash == EXPECTED
    assert "images.example.com" in describe(policy)
    default = ServerConfig().media_policy
    assert default.allowed_local_media_path is None and default.allowed_media_domains is None
    with pytest.raises(ValueError, match="allowed_local_media_path=.*not a directory"):
        ServerConfig(allowed_local_media_path=str(media / "nope"))


def test_serve_flags_set_the_media_fields(media):
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--allowed-local-media-path",
            str(media),
            "--allowed-media-domains",
            "a.example.com",
            "b.example.org",
            "--media-fetch-timeout",
            "2.5",
            "--max-media-bytes",
            "4096",
        ]
    )
    cli.check_args(args)
    assert args.allowed_local_media_path == str(media)
    assert args.allowed_media_domains == ["a.example.com", "b.example.org"]
    assert (args.media_fetch_timeout, args.max_media_bytes) == (2.5, 4096)
    defaults = cli.build_parser().parse_args(["serve"])
    assert defaults.allowed_local_media_path is None and defaults.allowed_media_domains is None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--allowed-local-media-path", "/no/such/dir"], "--allowed-local-media-path=/no/such"),
        (["--allowed-media-domains", "http://a.com"], "--allowed-media-domains: 'http://a.com'"),
        (["--media-fetch-timeout", "0"], "--media-fetch-timeout=0.0: must be > 0"),
        (["--max-media-bytes", "0"], "--max-media-bytes=0: must be >= 1"),
    ],
)
def test_bad_media_flags_are_usage_errors(flags, message):
    args = cli.build_parser().parse_args(["serve", *flags])
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        cli.check_args(args)


def test_serve_help_lists_the_media_flags(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for flag in (
        "--allowed-local-media-path DIR",
        "--allowed-media-domains HOST",
        "--media-fetch-timeout",
        "--max-media-bytes",
    ):
        assert flag in help_text, flag
