"""The vision-embedding cache: LRU bounded in bytes, an oversize entry returned but
not kept, one encoder pass per distinct image in a call and across threads, stats,
and the engine option that sizes it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from plait.multimodal.embedding_cache import (
    STAT_FIELDS,
    CacheStats,
    EmbeddingCache,
    cache_key,
    nbytes,
    prometheus_families,
)
from plait.multimodal.image import load_image
from plait.runtime import cli
from plait.runtime.config import EngineConfig


def emb(n_floats: int, fill: float = 0.0) -> torch.Tensor:
    """An fp32 embedding of ``n_floats * 4`` bytes."""
    return torch.full((n_floats,), fill, dtype=torch.float32)


class CountingEncoder:
    """A real (tiny) vision encoder: mean pixel per channel times a fixed projection,
    recording each batch it is called with."""

    def __init__(self, images: list, delay_s: float = 0.0):
        self.images = images
        self.delay_s = delay_s
        self.batches: list[list[int]] = []
        self.proj = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        self.lock = threading.Lock()

    def encode_one(self, image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.image, dtype=np.float32)).reshape(-1, 3)
        return pixels.mean(0) @ self.proj

    def __call__(self, positions: list[int]) -> list[torch.Tensor]:
        with self.lock:
            self.batches.append(list(positions))
        time.sleep(self.delay_s)
        return [self.encode_one(self.images[i]) for i in positions]


def picture(color: tuple[int, int, int], size: int = 8):
    return load_image(Image.new("RGB", (size, size), color))


SETTINGS = ("tiny-processor", 224)


# ---- LRU and the byte bound --------------------------------------------------------------


def test_the_least_recently_used_entry_goes_first():
    cache = EmbeddingCache(capacity_bytes=300)
    for name in "abc":
        assert cache.put(name, emb(25))  # 100 bytes each: full
    assert cache.get("a") is not None  # a is now the most recent; b the least
    cache.put("d", emb(25))
    assert "b" not in cache
    assert all(k in cache for k in "acd")
    s = cache.stats()
    assert (s.evictions, s.bytes, s.entries) == (1, 300, 3)


def test_bytes_never_exceed_the_budget_and_equal_what_is_held():
    cache = EmbeddingCache(capacity_bytes=1000)
    held: dict[int, int] = {}
    for i in range(200):
        size = (i * 37) % 60 + 1  # floats
        cache.put(i, emb(size))
        held[i] = size * 4
        s = cache.stats()
        assert s.bytes <= 1000
        assert s.bytes == sum(b for k, b in held.items() if k in cache)
    assert cache.stats().evictions == 200 - len(cache)


def test_a_list_of_tensors_is_sized_by_their_sum():
    tiles = [emb(10), emb(20), torch.zeros(2, 3, dtype=torch.float16)]
    assert nbytes(tiles) == 40 + 80 + 12
    cache = EmbeddingCache(capacity_bytes=10_000)
    cache.put("tiles", tiles)
    assert cache.stats().bytes == 132
    with pytest.raises(TypeError, match="tensor or a list of tensors, not str"):
        cache.put("bad", "not a tensor")


def test_replacing_a_key_does_not_count_its_bytes_twice():
    cache = EmbeddingCache(capacity_bytes=1000)
    cache.put("a", emb(100))
    cache.put("a", emb(50))
    assert cache.stats().bytes == 200 and len(cache) == 1


def test_an_entry_larger_than_the_budget_is_returned_but_not_kept():
    cache = EmbeddingCache(capacity_bytes=400)
    cache.put("small", emb(50))
    huge = emb(200, fill=7.0)  # 800 bytes
    [out] = cache.get_or_encode(["huge"], lambda positions: [huge])
    assert out is huge
    assert "huge" not in cache
    assert "small" in cache  # nothing was evicted to try to make room
    s = cache.stats()
    assert (s.bytes, s.entries, s.evictions, s.misses) == (200, 1, 0, 1)


def test_a_budget_of_zero_keeps_nothing_but_still_encodes_each_image_once():
    a = picture((255, 0, 0))
    encoder = CountingEncoder([a, a, a])
    cache = EmbeddingCache(capacity_bytes=0)
    key = cache_key(a.content_hash, SETTINGS)
    out = cache.get_or_encode([key, key, key], encoder)
    assert encoder.batches == [[0]] and len(cache) == 0
    assert out[0] is out[1] is out[2]


def test_from_gb_is_in_gib():
    assert EmbeddingCache.from_gb(0.5).capacity_bytes == 2**29
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        EmbeddingCache(-1)


# ---- one encoder pass per distinct image ---------------------------------------------------


def test_eight_requests_for_one_image_run_the_encoder_once():
    image = picture((10, 200, 30))
    images = [load_image(image.image.copy()) for _ in range(8)]  # 8 loads, one content
    encoder = CountingEncoder(images)
    cache = EmbeddingCache(capacity_bytes=2**20)
    keys = [cache_key(im.content_hash, SETTINGS) for im in images]
    out = cache.get_or_encode(keys, encoder)
    assert encoder.batches == [[0]]
    assert all(o is out[0] for o in out)
    assert torch.equal(out[0], encoder.encode_one(image))
    s = cache.stats()
    assert (s.misses, s.hits, s.entries) == (1, 7, 1)


def test_the_missing_images_of_a_call_are_encoded_in_one_batch():
    red, green, blue = picture((255, 0, 0)), picture((0, 255, 0)), picture((0, 0, 255))
    cache = EmbeddingCache(capacity_bytes=2**20)
    first = CountingEncoder([red])
    cache.get_or_encode([cache_key(red.content_hash, SETTINGS)], first)

    images = [green, red, green, blue, red]
    encoder = CountingEncoder(images)
    keys = [cache_key(im.content_hash, SETTINGS) for im in images]
    out = cache.get_or_encode(keys, encoder)
    assert encoder.batches == [[0, 3]]  # green and blue, each once; red was cached
    for image, value in zip(images, out):
        assert torch.equal(value, encoder.encode_one(image))
    s = cache.stats()
    assert (s.misses, s.hits) == (3, 3)  # red, green, blue; red again, green and red repeats


def test_the_same_picture_by_path_or_base64_is_one_entry(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)
    by_path = load_image(str(path))
    by_data_url = load_image(by_path.to_data_url())
    cache = EmbeddingCache(capacity_bytes=2**20)
    encoder = CountingEncoder([by_path, by_data_url])
    keys = [cache_key(im.content_hash, SETTINGS) for im in (by_path, by_data_url)]
    cache.get_or_encode(keys, encoder)
    assert encoder.batches == [[0]]


def test_processor_settings_are_part_of_the_key():
    image = picture((9, 9, 9))
    cache = EmbeddingCache(capacity_bytes=2**20)
    encoder = CountingEncoder([image, image])
    keys = [cache_key(image.content_hash, ("p", 224)), cache_key(image.content_hash, ("p", 448))]
    cache.get_or_encode(keys, encoder)
    assert encoder.batches == [[0, 1]] and len(cache) == 2


def test_an_encoder_returning_the_wrong_count_is_an_error_and_leaves_nothing_pending():
    cache = EmbeddingCache(capacity_bytes=2**20)
    with pytest.raises(ValueError, match="returned 0 embeddings for 2 images"):
        cache.get_or_encode(["a", "b"], lambda positions: [])
    # Nothing is left claimed: the next call encodes the keys itself.
    assert cache.get_or_encode(["a"], lambda positions: [emb(1)])[0].shape == (1,)


# ---- threads -------------------------------------------------------------------------------


def test_threads_asking_for_one_image_at_once_run_the_encoder_once():
    image = picture((100, 100, 100))
    encoder = CountingEncoder([image], delay_s=0.2)  # long enough for every thread to ask
    cache = EmbeddingCache(capacity_bytes=2**20)
    key = cache_key(image.content_hash, SETTINGS)
    start = threading.Barrier(8)
    results = [None] * 8

    def ask(i: int) -> None:
        start.wait()
        results[i] = cache.get_or_encode([key], encoder)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert encoder.batches == [[0]]  # the other seven waited for the first encode
    assert all(r is results[0] for r in results)
    s = cache.stats()
    assert (s.misses, s.hits) == (1, 7)


def test_two_calls_waiting_on_each_others_image_both_finish():
    a, b = picture((1, 0, 0)), picture((0, 1, 0))
    ka, kb = (cache_key(im.content_hash, SETTINGS) for im in (a, b))
    cache = EmbeddingCache(capacity_bytes=2**20)
    enc_ab, enc_ba = CountingEncoder([a, b], delay_s=0.2), CountingEncoder([b, a], delay_s=0.2)
    start = threading.Barrier(2)
    out = {}

    def ask(name, keys, encoder):
        start.wait()
        out[name] = cache.get_or_encode(keys, encoder)

    threads = [
        threading.Thread(target=ask, args=("ab", [ka, kb], enc_ab)),
        threading.Thread(target=ask, args=("ba", [kb, ka], enc_ba)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert cache.stats().misses == 2  # each image encoded once, by one call or the other
    assert out["ab"][0] is out["ba"][1] and out["ab"][1] is out["ba"][0]


def test_a_waiter_encodes_the_image_itself_when_the_first_encode_fails():
    image = picture((5, 5, 5))
    key = cache_key(image.content_hash, SETTINGS)
    cache = EmbeddingCache(capacity_bytes=2**20)
    encoding = threading.Event()

    def failing(positions):
        encoding.set()
        time.sleep(0.3)  # the second caller is waiting on this encode by now
        raise RuntimeError("out of memory in the first request's batch")

    second = CountingEncoder([image])
    errors, results = [], []

    def first_call():
        try:
            cache.get_or_encode([key], failing)
        except RuntimeError as e:
            errors.append(e)

    def second_call():
        encoding.wait(5)
        results.append(cache.get_or_encode([key], second)[0])

    threads = [threading.Thread(target=first_call), threading.Thread(target=second_call)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 1  # the failure stays with the call whose encode failed
    assert second.batches == [[0]]
    assert torch.equal(results[0], second.encode_one(image)) and key in cache


# ---- stats and the engine option ---------------------------------------------------------


def test_stats_count_hits_misses_and_name_every_figure():
    cache = EmbeddingCache(capacity_bytes=100)
    assert cache.get("a") is None
    cache.put("a", emb(25))
    assert cache.get("a") is not None
    cache.put("b", emb(25))  # evicts a
    s = cache.stats()
    assert s == CacheStats(hits=1, misses=1, evictions=1, bytes=100, entries=1, capacity_bytes=100)
    figures = s.as_dict()
    assert set(figures) == set(STAT_FIELDS)
    assert figures["mm_cache_hit_rate"] == 0.5
    assert all(kind in ("counter", "gauge") for kind, _ in STAT_FIELDS.values())
    cache.clear()
    assert cache.stats().bytes == 0 and cache.stats().hits == 1  # counters stay


def test_stats_render_as_prometheus_counters_and_gauges():
    from prometheus_client import CollectorRegistry, generate_latest

    cache = EmbeddingCache(capacity_bytes=1000)
    cache.get_or_encode(["a", "a", "b"], lambda positions: [emb(10) for _ in positions])

    class Collector:  # what the server's engine collector does with get_stats()
        def collect(self):
            yield from prometheus_families({"num_running_reqs": 0, **cache.stats().as_dict()})

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert "# TYPE plait_mm_cache_hits_total counter" in text
    assert "plait_mm_cache_hits_total 1.0" in text
    assert "plait_mm_cache_misses_total 2.0" in text
    assert "# TYPE plait_mm_cache_bytes gauge" in text and "plait_mm_cache_bytes 80.0" in text
    assert "num_running_reqs" not in text  # only the cache's own figures


def test_engine_config_sizes_the_cache_and_names_a_bad_value():
    assert EngineConfig().mm_cache_memory_gb == 0.5
    assert EngineConfig(mm_cache_memory_gb=0.25).mm_cache_bytes == 2**28
    assert EngineConfig(mm_cache_memory_gb=0).mm_cache_bytes == 0
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match=r"mm_cache_memory_gb=.*: must be >= 0"):
            EngineConfig(mm_cache_memory_gb=bad)


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["bench", "engine"]])
def test_the_cli_flag_reaches_the_engine_options(command):
    parser = cli.build_parser()
    args = parser.parse_args([*command, "--mm-cache-memory-gb", "1.5"])
    assert cli._engine_kwargs(args)["mm_cache_memory_gb"] == 1.5
    assert cli._engine_kwargs(parser.parse_args(command))["mm_cache_memory_gb"] == 0.5
    with pytest.raises(cli.UsageError, match=r"--mm-cache-memory-gb=-1.0: must be >= 0"):
        cli.check_args(parser.parse_args([*command, "--mm-cache-memory-gb", "-1"]))
