"""`llmctl bench serve`: load any OpenAI-compatible server with streaming requests and report
`vllm bench serve`'s metrics (request / output / total token throughput; TTFT, TPOT, ITL,
E2EL mean / median / p99 in ms; goodput), so numbers compare across servers.

Beyond vLLM's client: `duration_s` keeps `max_concurrency` clients busy for a fixed time
(a soak test), and `disconnect_fraction` makes some clients hang up mid-stream, the way
real users do; those requests count as `disconnected`, not as failures.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    model: str | None = None  # None: the first of /v1/models
    api_key: str | None = None
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    max_concurrency: int | None = None  # None: all at once
    request_rate: float = float("inf")  # requests/s (Poisson arrivals); inf: no pacing
    duration_s: float | None = None  # keep the clients busy this long instead of num_prompts
    disconnect_fraction: float = 0.0
    ignore_eos: bool = True
    seed: int = 0
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2el


@dataclass
class RequestResult:
    success: bool = False
    disconnected: bool = False
    status: int | None = None
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


def make_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """Prompts of about input_len tokens from the embedded Wikipedia corpus (evaluation
    split), so no tokenizer is needed on the client: ~0.75 words per token in English."""
    from llmctl.paths import wiki_corpus_json

    articles = json.loads(wiki_corpus_json().read_text())
    words = " ".join(articles[k]["extract"] for k in sorted(articles)[-1000:]).split()
    rng = random.Random(seed)
    num_words = max(1, int(input_len * 0.75))
    starts = [rng.randrange(0, len(words) - num_words) for _ in range(num)]
    return [" ".join(words[s:s + num_words]) for s in starts]


def _payload(cfg: ServeBenchConfig, model: str, prompt: str) -> dict:
    body = {"model": model, "max_tokens": cfg.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": cfg.ignore_eos}
    if cfg.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _one_request(client: httpx.AsyncClient, cfg: ServeBenchConfig, model: str, prompt: str,
                       hang_up_after: int | None) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", cfg.endpoint, json=_payload(cfg, model, prompt)) as resp:
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = (await resp.aread()).decode(errors="replace")[:300]
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"])[:300]
                    return res
                if data.get("usage"):
                    res.prompt_len = data["usage"]["prompt_tokens"]
                    res.output_len = data["usage"]["completion_tokens"]
                choice = (data.get("choices") or [{}])[0]
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    if hang_up_after is not None and len(res.itl) + 1 >= hang_up_after:
                        res.disconnected = True
                        return res  # leaving the `with` closes the connection mid-stream
        res.latency = time.perf_counter() - start
        res.output_len = res.output_len or len(res.itl) + 1
        res.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as err:
        res.error = f"{type(err).__name__}: {err}"
    return res


async def _first_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_load(cfg: ServeBenchConfig, prompts: list[str]) -> tuple[list[RequestResult], float]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    rng = random.Random(cfg.seed + 1)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:
        model = cfg.model or await _first_model(client)
        slots = asyncio.Semaphore(cfg.max_concurrency or len(prompts) or 1)
        start = time.perf_counter()
        deadline = start + cfg.duration_s if cfg.duration_s else None

        async def worker(prompt: str) -> None:
            async with slots:
                hang_up = rng.randint(1, max(1, cfg.output_len - 1)) if rng.random() < cfg.disconnect_fraction else None
                results.append(await _one_request(client, cfg, model, prompt, hang_up))

        async def soak_client(i: int) -> None:
            k = i
            while time.perf_counter() < deadline:
                await worker(prompts[k % len(prompts)])
                k += cfg.max_concurrency or 1

        if deadline is not None:
            await asyncio.gather(*[soak_client(i) for i in range(cfg.max_concurrency or 1)])
        else:
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(worker(prompt)))
                if cfg.request_rate != float("inf"):
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return results, duration


def summarize(cfg: ServeBenchConfig, results: list[RequestResult], duration: float) -> dict:
    """vllm bench serve's summary; times in ms."""
    done = [r for r in results if r.success]
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    tpots = [(r.latency - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]
    series = {"ttft": [r.ttft for r in done], "tpot": tpots, "itl": [x for r in done for x in r.itl],
              "e2el": [r.latency for r in done]}
    summary = {
        "completed": len(done), "failed": sum(not r.success and not r.disconnected for r in results),
        "disconnected": sum(r.disconnected for r in results),
        "status_5xx": sum(1 for r in results if r.status is not None and r.status >= 500),
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    for name, values in series.items():
        ms = np.asarray(values, dtype=float) * 1000.0 if values else np.zeros(1)
        summary.update({f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
                        f"std_{name}_ms": float(ms.std()), f"p99_{name}_ms": float(np.percentile(ms, 99))})
    if cfg.goodput:
        good = [r for r in done if _meets_slo(r, cfg.goodput)]
        summary["request_goodput"] = len(good) / duration
    summary["config"] = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    return summary


def _meets_slo(r: RequestResult, slo_ms: dict[str, float]) -> bool:
    tpot = (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0
    values = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
    return all(values[k] * 1000.0 <= v for k, v in slo_ms.items())


def benchmark(cfg: ServeBenchConfig) -> dict:
    num = cfg.num_prompts if not cfg.duration_s else max(cfg.num_prompts, 4 * (cfg.max_concurrency or 1))
    prompts = make_prompts(num, cfg.input_len, cfg.seed)
    results, duration = asyncio.run(run_load(cfg, prompts))
    return summarize(cfg, results, duration)
