"""`llmctl bench serve`: load any OpenAI-compatible server with streaming requests and report
`vllm bench serve`'s metrics, so numbers compare across servers.

One run: first contact (clear errors before any load), the workload (`workload.py`), its
arrival schedule (`arrivals.py`), the load (`loadgen.py`) with the server's /metrics
watched (`scrape.py`), then the summary (`metrics.py`) and the per-request records.
Beyond vLLM's client: `duration_s` repeats the workload for a fixed time (a soak test), and
`disconnect_fraction` makes some clients hang up mid-stream, as real users do; those
requests count as `disconnected`, not as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field

import httpx

from llmctl.bench.arrivals import ArrivalConfig, arrival_times
from llmctl.bench.client import RequestResult, ServerInfo, check_base_url, first_contact
from llmctl.bench.loadgen import LiveState, LoadConfig, LoadOutcome, StopRule, run_load
from llmctl.bench.metrics import METRICS, summarize
from llmctl.bench.scrape import ServerWatch
from llmctl.bench.workload import BenchRequest, WorkloadConfig, build_workload, describe

# (event, payload): "contact" {"info"}, "workload" {"num_requests"}, "start" {"total", "target"},
# "result" {"result", "state"}. The CLI draws; nothing here does.
ServeCallback = Callable[[str, dict], None]


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    model: str | None = None  # None: the first of /v1/models
    api_key: str | None = None
    tokenizer: str | None = None  # a local tokenizer dir; None: the server's /tokenize
    dataset: str = "random"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int | None = 128
    range_ratio: float = 0.0
    prefix_len: int = 0
    request_rate: float = math.inf
    arrival: str = "poisson"
    burstiness: float = 1.0
    ramp_up: str | None = None
    ramp_up_start_rps: float | None = None
    ramp_up_end_rps: float | None = None
    max_concurrency: int | None = None
    num_warmups: int = 0
    duration_s: float | None = None
    disconnect_fraction: float = 0.0
    seed: int = 0
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2el
    percentile_metrics: tuple[str, ...] = METRICS
    metric_percentiles: tuple[float, ...] = (99.0,)

    def __post_init__(self) -> None:
        check_base_url(self.base_url)
        self.workload_config()
        self.arrival_config()
        self.load_config()

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")

    def workload_config(self) -> WorkloadConfig:
        return WorkloadConfig(dataset=self.dataset, num_prompts=self.num_prompts + self.num_warmups,
                              input_len=self.input_len, output_len=self.output_len, range_ratio=self.range_ratio,
                              prefix_len=self.prefix_len, chat=self.chat, seed=self.seed)

    def arrival_config(self) -> ArrivalConfig:
        return ArrivalConfig(request_rate=self.request_rate, process=self.arrival, burstiness=self.burstiness,
                             ramp_up=self.ramp_up, ramp_up_start_rps=self.ramp_up_start_rps,
                             ramp_up_end_rps=self.ramp_up_end_rps)

    def load_config(self) -> LoadConfig:
        return LoadConfig(max_concurrency=self.max_concurrency, duration_s=self.duration_s,
                          disconnect_fraction=self.disconnect_fraction, num_warmups=self.num_warmups, seed=self.seed)

    def send_times(self, num: int) -> list[float] | None:
        """The schedule: None sends all at once (or as fast as --max-concurrency lets)."""
        arrivals = self.arrival_config()
        if arrivals.ramp_up is None and not math.isfinite(arrivals.request_rate):
            return None
        if self.duration_s:  # a soak: enough arrivals to outlast the duration
            top = max(arrivals.rates(2)) if arrivals.ramp_up else arrivals.request_rate
            num = max(num, int(top * self.duration_s * 2) + 16)
        return arrival_times(arrivals, num, self.seed).tolist()

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "api_key"}


@contextlib.asynccontextmanager
async def open_client(cfg: ServeBenchConfig, base_url: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url or cfg.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0, connect=10.0)) as client:
        yield client


def make_workload(cfg: ServeBenchConfig, info: ServerInfo) -> list[BenchRequest]:
    """The workload, its prompts counted by --tokenizer or else by the server's /tokenize."""
    from llmctl.bench.tokenizer import LocalTokenizer, ServerTokenizer

    wl = cfg.workload_config()
    if cfg.tokenizer:
        return build_workload(wl, LocalTokenizer(cfg.tokenizer), info.max_model_len)
    if not wl.needs_tokenizer:
        return build_workload(wl, None, info.max_model_len)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    tok = ServerTokenizer(info.base_url, info.model, headers)
    try:
        return build_workload(wl, tok, info.max_model_len)
    finally:
        tok.close()


def request_record(res: RequestResult, req: BenchRequest) -> dict:
    """One line of the per-request JSON and CSV."""
    out = asdict(res)
    out.update(expected_prompt_len=req.prompt_len, requested_output_len=req.output_len)
    out["tpot"] = res.tpot
    return out


async def measure(cfg: ServeBenchConfig, client: httpx.AsyncClient, info: ServerInfo, requests: list[BenchRequest],
                  times: list[float] | None, on_event: ServeCallback | None = None,
                  stop_rule: StopRule | None = None) -> tuple[LoadOutcome, dict | None]:
    """One load run against one server, its /metrics watched."""
    def on_result(res: RequestResult, state: LiveState) -> None:
        if on_event:
            on_event("result", {"result": res, "state": state})

    if on_event:
        on_event("start", {"total": None if cfg.duration_s else len(requests), "target": info.base_url})
    watch = ServerWatch(client)
    await watch.start()
    outcome = await run_load(client, cfg.endpoint, info.model, requests, times, cfg.load_config(),
                             target=info.base_url, on_result=on_result, stop_rule=stop_rule)
    await watch.stop()
    return outcome, watch.report()


def build_report(cfg: ServeBenchConfig, info: ServerInfo, requests: list[BenchRequest], outcome: LoadOutcome,
                 server_metrics: dict | None) -> dict:
    report = summarize(outcome.results, cfg.percentile_metrics, cfg.metric_percentiles, cfg.goodput or None)
    report.update(
        backend="openai-chat" if cfg.chat else "openai", base_url=info.base_url, model_id=info.model,
        endpoint=cfg.endpoint, request_rate=cfg.request_rate, burstiness=cfg.burstiness,
        max_concurrency=cfg.max_concurrency, arrivals=cfg.arrival_config().describe(), stopped_early=outcome.stopped,
        wall_s=outcome.wall_s, server_metrics=server_metrics, config=cfg.to_dict(),
        workload=describe(cfg.workload_config(), requests),
        requests=[request_record(r, requests[r.index % len(requests)]) for r in outcome.results])
    return report


async def run_benchmark(cfg: ServeBenchConfig, on_event: ServeCallback | None = None,
                        stop_rule: StopRule | None = None) -> dict:
    async with open_client(cfg) as client:
        info = await first_contact(client, cfg.base_url, cfg.model, cfg.endpoint)
        if on_event:
            on_event("contact", {"info": info})
        requests = await asyncio.to_thread(make_workload, cfg, info)
        outcome, server = await measure(cfg, client, info, requests, cfg.send_times(len(requests)), on_event, stop_rule)
    return build_report(cfg, info, requests, outcome, server)


def benchmark(cfg: ServeBenchConfig, on_event: ServeCallback | None = None) -> dict:
    return asyncio.run(run_benchmark(cfg, on_event))
