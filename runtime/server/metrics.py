"""``GET /metrics``: Prometheus text format, from the standard client library.

Counters and histograms are updated as requests finish; the engine's live
figures (queues, KV slots, prefix-cache hit rate, and a vision-language model's
embedding cache) are read at scrape time.
Each app has its own registry, so several servers can live in one process.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from plait.multimodal.embedding_cache import prometheus_families

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class _EngineCollector:
    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self):
        stats = self.engine.get_stats()
        gauges = {
            "num_running_reqs": "requests being decoded or prefilled",
            "num_waiting_reqs": "requests waiting for admission",
            "kv_slots_used": "KV cache slots in use (requests and prefix cache)",
            "kv_slots_free": "free KV cache slots",
            "cache_tokens": "tokens held by the prefix cache",
            "cache_hit_rate": "prompt tokens found in the prefix cache / prompt tokens queried",
        }
        for name, doc in gauges.items():
            yield GaugeMetricFamily(f"plait_{name}", doc, value=float(stats[name]))
        yield from prometheus_families(stats)  # the vision-embedding cache (VLMs only)


class Metrics:
    def __init__(self, engine: Any):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "plait_http_requests",
            "HTTP requests by route and status",
            ["path", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "plait_http_request_duration_seconds",
            "time to the response headers",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("plait_prompt_tokens", "prompt tokens", registry=r)
        self.cached_tokens = Counter(
            "plait_cached_prompt_tokens", "prompt tokens served from the prefix cache", registry=r
        )
        self.generation_tokens = Counter("plait_generation_tokens", "generated tokens", registry=r)
        self.finished = Counter(
            "plait_requests_finished", "finished generations by reason", ["reason"], registry=r
        )
        self.e2e = Histogram(
            "plait_e2e_request_latency_seconds",
            "end-to-end latency of a generation",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "plait_time_to_first_token_seconds",
            "time to the first streamed piece",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("plait_images_generated", "images generated", registry=r)
        self.image_requests = Counter(
            "plait_image_requests",
            "image generation requests by outcome (ok, invalid, cancelled, backend_error, error)",
            ["status"],
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def http(self, route: str, status: int, seconds: float) -> None:
        """Account one response; ``route`` is the route's path template (or "other")."""
        self.requests.labels(route, str(status)).inc()
        self.http_latency.labels(route).observe(seconds)

    def record(self, results: Any) -> None:
        """Account finished result dicts (one, or a list)."""
        for out in results if isinstance(results, list) else [results]:
            meta = out["meta_info"]
            self.prompt_tokens.inc(meta["prompt_tokens"])
            self.cached_tokens.inc(meta.get("cached_tokens", 0))
            self.generation_tokens.inc(meta["completion_tokens"])
            reason = (meta.get("finish_reason") or {}).get("type", "unknown")
            self.finished.labels(reason).inc()
            if "e2e_latency" in meta:
                self.e2e.observe(meta["e2e_latency"])

    def aborted(self, n: int) -> None:
        """Account requests aborted before a result reached the server (their client
        went away)."""
        self.finished.labels("abort").inc(n)

    def image_request(self, status: str, images: int = 0) -> None:
        """Account one /v1/images/generations request and the images it made."""
        self.image_requests.labels(status).inc()
        self.images.inc(images)

    def first_token(self, piece: dict) -> None:
        latency = piece["meta_info"].get("e2e_latency")
        if latency is not None:
            self.ttft.observe(latency)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
