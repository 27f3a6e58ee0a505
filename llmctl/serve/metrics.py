"""Prometheus metrics under vLLM's names with an `llmctl:` prefix.

`ServerMetrics.record_step` is the AsyncEngine's step hook: it runs on the engine
thread after every step with the engine's stats and the step's outputs, so the
latency histograms time the engine, not the HTTP handlers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# vLLM leaves out the `*_created` series too.
disable_created_metrics()

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


def stat(stats: Any, name: str, default: float = 0.0) -> float:
    """Read one engine stat whether the engine reports a mapping or an object."""
    value = stats.get(name, default) if isinstance(stats, Mapping) else getattr(stats, name, default)
    return default if value is None else value


class _RequestTimes:
    __slots__ = ("arrival", "first_token", "last_token", "num_tokens")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.num_tokens = 0


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        self._times: dict[str, _RequestTimes] = {}
        self._last_counters: dict[str, float] = {}
        labels = ["model_name"]

        # Each series is created up front, so a scrape shows every name (at 0) from the start.
        def gauge(name: str, doc: str) -> Gauge:
            metric = Gauge(f"llmctl:{name}", doc, labels, registry=self.registry)
            metric.labels(model_name)
            return metric

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            metric = Counter(f"llmctl:{name}", doc, labels + list(extra), registry=self.registry)
            if not extra:
                metric.labels(model_name)
            return metric

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            metric = Histogram(f"llmctl:{name}", doc, labels, buckets=buckets, registry=self.registry)
            metric.labels(model_name)
            return metric

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means every block is used.")
        self.kv_cache_free_blocks = gauge("kv_cache_free_blocks", "KV-cache blocks free (cached-but-unused count as free).")
        self.kv_cache_total_blocks = gauge("kv_cache_total_blocks", "KV-cache blocks in total.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens produced.")
        self.num_preemptions = counter("num_preemptions", "Cumulative preemptions.")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prefix-cache queries, in tokens.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.request_success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.time_to_first_token = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.inter_token_latency = hist("inter_token_latency_seconds", "Inter-token latency.", _LATENCY_BUCKETS)
        self.e2e_request_latency = hist("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.request_queue_time = hist("request_queue_time_seconds", "Time spent waiting.", _LATENCY_BUCKETS)
        self.request_prefill_time = hist("request_prefill_time_seconds", "Time in prefill.", _LATENCY_BUCKETS)
        self.request_decode_time = hist("request_decode_time_seconds", "Time in decode.", _LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt length per request.", _TOKEN_BUCKETS)
        self.request_generation_tokens = hist("request_generation_tokens", "Generated tokens per request.", _TOKEN_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the step hook ---------------------------------------------------------------

    def record_step(self, stats: Any, outputs: list, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._record_stats(stats)
        for out in outputs:
            self._record_output(out, now)

    def record_abort(self, request_id: str) -> None:
        """The abort hook (engine thread): count the request as finished by "abort" and keep no
        per-request state for it."""
        self._times.pop(request_id, None)
        self.request_success.labels(self.model_name, "abort").inc()

    @property
    def num_tracked_requests(self) -> int:
        """Requests with per-request state (in flight); 0 at idle."""
        return len(self._times)

    def _record_stats(self, stats: Any) -> None:
        m = self.model_name
        self.num_requests_running.labels(m).set(stat(stats, "num_running"))
        self.num_requests_waiting.labels(m).set(stat(stats, "num_waiting"))
        self.kv_cache_usage_perc.labels(m).set(stat(stats, "kv_cache_usage"))
        self.kv_cache_free_blocks.labels(m).set(stat(stats, "num_free_blocks"))
        self.kv_cache_total_blocks.labels(m).set(stat(stats, "num_total_blocks"))
        for name, metric in (("num_preemptions", self.num_preemptions),
                             ("prefix_cache_queries", self.prefix_cache_queries),
                             ("prefix_cache_hits", self.prefix_cache_hits)):
            value = stat(stats, name)
            delta = value - self._last_counters.get(name, 0.0)
            if delta > 0:
                metric.labels(m).inc(delta)
            self._last_counters[name] = value

    def _record_output(self, out: Any, now: float) -> None:
        m = self.model_name
        arrival = getattr(out.metrics, "arrival_time", None) or now
        times = self._times.setdefault(out.request_id, _RequestTimes(arrival))
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new_tokens = num_tokens - times.num_tokens
        if new_tokens > 0:
            if times.first_token is None:
                times.first_token = now
                self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
                self.time_to_first_token.labels(m).observe(now - times.arrival)
            else:
                self.inter_token_latency.labels(m).observe(now - times.last_token)
            times.last_token = now
            times.num_tokens = num_tokens
            self.generation_tokens.labels(m).inc(new_tokens)
        if out.finished:
            self._record_finished(out, times, now)
            del self._times[out.request_id]

    def _record_finished(self, out: Any, times: _RequestTimes, now: float) -> None:
        m = self.model_name
        metrics = out.metrics
        first_token = times.first_token or now
        scheduled = getattr(metrics, "first_scheduled_time", None) or times.arrival
        self.e2e_request_latency.labels(m).observe(now - times.arrival)
        self.request_queue_time.labels(m).observe(max(0.0, scheduled - times.arrival))
        self.request_prefill_time.labels(m).observe(max(0.0, first_token - scheduled))
        self.request_decode_time.labels(m).observe(max(0.0, now - first_token))
        self.request_prompt_tokens.labels(m).observe(len(out.prompt_token_ids))
        self.request_generation_tokens.labels(m).observe(times.num_tokens)
        for c in out.outputs:
            self.request_success.labels(m, c.finish_reason or "abort").inc()
