"""The server's own view of a benchmark run, from its Prometheus `/metrics` (llmctl's
`llmctl:` series or vLLM's `vllm:` ones, same names): read before and after the run and
sampled during it, it gives KV-cache usage, preemptions, prefix-cache hit rate, queue
time and the waiting queue's peak. Servers without such metrics get none of this."""

from __future__ import annotations

import asyncio
import re

import httpx

_PREFIXES = ("llmctl:", "vllm:")
_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Series name (prefix dropped) -> value, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.startswith("#"):
            continue
        name = m.group(1)
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                try:
                    value = float(m.group(3))
                except ValueError:
                    break
                key = name[len(prefix):]
                out[key] = out.get(key, 0.0) + value
                break
    return out


async def scrape(client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        resp = await client.get("/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    values = parse_prometheus(resp.text)
    return values or None


def _usage(m: dict[str, float]) -> float | None:
    return m.get("kv_cache_usage_perc", m.get("gpu_cache_usage_perc"))


class ServerWatch:
    """Scrapes /metrics every `every_s` while a run goes on; `report()` says what changed."""

    def __init__(self, client: httpx.AsyncClient, every_s: float = 1.0) -> None:
        self._client = client
        self._every_s = every_s
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self.samples: list[dict[str, float]] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.before = await scrape(self._client)
        if self.before is not None:
            self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            sample = await scrape(self._client)
            if sample:
                self.samples.append(sample)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.before is not None:
            self.after = await scrape(self._client)

    def report(self) -> dict | None:
        if not self.before or not self.after:
            return None
        b, a = self.before, self.after
        seen = self.samples + [a]

        def delta(name: str) -> float | None:
            return a[name] - b.get(name, 0.0) if name in a else None

        usages = [u for u in (_usage(s) for s in seen) if u is not None]
        out = {"kv_cache_usage_max": max(usages) if usages else None,
               "kv_cache_usage_mean": sum(usages) / len(usages) if usages else None,
               "num_requests_waiting_max": max((s.get("num_requests_waiting", 0.0) for s in seen), default=None),
               "num_preemptions": delta("num_preemptions_total"),
               "prefix_cache_queries": delta("prefix_cache_queries_total"),
               "prefix_cache_hits": delta("prefix_cache_hits_total")}
        queries, hits = out["prefix_cache_queries"], out["prefix_cache_hits"]
        out["prefix_cache_hit_rate"] = hits / queries if queries and hits is not None else None
        count, total = delta("request_queue_time_seconds_count"), delta("request_queue_time_seconds_sum")
        out["mean_queue_time_ms"] = 1000.0 * total / count if count and total is not None else None
        out["num_samples"] = len(seen)
        return out
