"""The load generator of `llmctl bench serve`: sends a workload on its arrival schedule,
at most `max_concurrency` at a time, marks warm-up requests, hangs up on some on purpose,
and lets a stop rule end the run early (an over-saturated server)."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from llmctl.bench.client import RequestResult, send_request
from llmctl.bench.workload import BenchRequest
from llmctl.errors import ConfigError


@dataclass(frozen=True)
class LoadConfig:
    max_concurrency: int | None = None  # None: no limit
    duration_s: float | None = None  # soak: cycle the workload until this many seconds passed
    disconnect_fraction: float = 0.0
    num_warmups: int = 0  # the first requests sent; not in the statistics
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency: must be at least 1, got {self.max_concurrency}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"--duration: must be positive, got {self.duration_s}")
        if not 0.0 <= self.disconnect_fraction <= 1.0:
            raise ConfigError(f"--disconnect-fraction: must be in [0, 1], got {self.disconnect_fraction}")
        if self.num_warmups < 0:
            raise ConfigError(f"--num-warmups: must be >= 0, got {self.num_warmups}")


@dataclass
class LiveState:
    """What a stop rule and a progress bar see while the load runs."""

    start: float
    num_sent: int = 0
    dispatching: bool = True  # False once every request is sent
    finished: list[RequestResult] = field(default_factory=list)  # in finishing order
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, requests in flight)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def in_flight(self) -> int:
        return self.num_sent - len(self.finished)


StopRule = Callable[[LiveState], "str | None"]  # a reason to stop, or None


@dataclass
class LoadOutcome:
    results: list[RequestResult]
    wall_s: float
    stopped: str | None = None  # why the run ended early


def _hang_up_plan(cfg: LoadConfig, req: BenchRequest, i: int) -> int | None:
    rng = random.Random(f"{cfg.seed}:disconnect:{i}")
    if rng.random() >= cfg.disconnect_fraction:
        return None
    return rng.randint(1, max(1, req.output_len - 1))


async def run_load(client: httpx.AsyncClient, endpoint: str, model: str, requests: Sequence[BenchRequest],
                   times: Sequence[float] | None, cfg: LoadConfig, target: str = "",
                   on_result: Callable[[RequestResult, LiveState], None] | None = None,
                   stop_rule: StopRule | None = None, check_every_s: float = 0.25, first_index: int = 0) -> LoadOutcome:
    """Send `requests` at `times` (seconds from the start; None: all at once). With
    `cfg.duration_s` the workload repeats, in order, until the time is up. `first_index`
    numbers the requests of a later round of one workload (A/B rounds)."""
    state = LiveState(start=time.perf_counter())
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    tasks: dict[int, asyncio.Task] = {}
    results: list[RequestResult] = []
    stopped: list[str] = []

    async def one(i: int, req: BenchRequest, res: RequestResult) -> None:
        try:
            await send_request(client, endpoint, req, model, res, _hang_up_plan(cfg, req, first_index + i))
        finally:
            res.end_time = state.elapsed
            if slots:
                slots.release()
            state.finished.append(res)
            if on_result:
                on_result(res, state)

    async def monitor() -> None:
        while True:
            await asyncio.sleep(check_every_s)
            state.timeline.append((state.elapsed, state.in_flight))
            reason = stop_rule(state) if stop_rule else None
            if reason and not stopped:
                stopped.append(reason)
                return

    watcher = asyncio.create_task(monitor())
    count = itertools.count() if cfg.duration_s else range(len(requests))
    for i in count:
        at = 0.0 if times is None else (times[i] if i < len(times) else math.inf)
        if cfg.duration_s and at >= cfg.duration_s:
            break
        delay = state.start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots:
            await slots.acquire()
        if stopped or (cfg.duration_s and state.elapsed >= cfg.duration_s):
            if slots:
                slots.release()
            break
        res = RequestResult(index=first_index + i, target=target, warmup=first_index + i < cfg.num_warmups,
                            scheduled_time=at,
                            send_time=state.elapsed)
        results.append(res)
        state.num_sent += 1
        tasks[i] = asyncio.create_task(one(i, requests[i % len(requests)], res))
    state.dispatching = False
    while tasks and not stopped and any(not t.done() for t in tasks.values()):
        await asyncio.wait([t for t in tasks.values() if not t.done()], timeout=check_every_s)
    watcher.cancel()
    for i, task in tasks.items():
        if not task.done():
            task.cancel()  # an over-saturated run: what is still in flight is dropped
            results[i].cancelled = True
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return LoadOutcome(results=results, wall_s=state.elapsed, stopped=stopped[0] if stopped else None)
