"""`llmctl bench serve sweep` and A/B runs: load points (a request rate or a concurrency)
measured on one or more targets, with the A/B rounds of `ab.py` at every point.

- rates: each rate in turn, stopped early when the server is over-saturated
  (`saturation.py`); the sweep ends at the first such rate (a target that saturates is
  not loaded at higher rates).
- concurrencies: each `max_concurrency` in turn, requests sent as fast as it lets.
- SLO search: the highest rate whose p99 TTFT / TPOT meet `slo`: first the capacity
  (everything sent at once), then a bisection between 0 and it.
Every point gets its own workload seed (same lengths, new prompts), so one point's
prompts are never served from the prefix cache another point filled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

from llmctl.bench.ab import TargetRuns, compare, round_order, round_slices
from llmctl.bench.client import first_contact
from llmctl.bench.loadgen import run_load
from llmctl.bench.saturation import saturation_rule
from llmctl.bench.scrape import ServerWatch
from llmctl.bench.serve_client import ServeBenchConfig, ServeCallback, make_workload, open_client, request_record
from llmctl.errors import ConfigError


@dataclass(frozen=True)
class SweepConfig:
    request_rates: tuple[float, ...] = ()
    concurrencies: tuple[int, ...] = ()
    slo: dict[str, float] = field(default_factory=dict)  # p99 limits in ms: ttft, tpot, e2el
    search_steps: int = 4
    saturation_after_s: float = 5.0  # no early stop before this many seconds of a run
    ab_rounds: int = 4

    def __post_init__(self) -> None:
        if self.request_rates and self.concurrencies:
            raise ConfigError("sweep: give --request-rates or --concurrencies, not both")
        if not (self.request_rates or self.concurrencies or self.slo):
            raise ConfigError("sweep: nothing to sweep", hint="give --request-rates 1,2,4, --concurrencies 1,4,16 "
                                                              "or --slo ttft:500 --slo tpot:50 (a search)")
        if any(not r > 0 for r in self.request_rates) or any(c < 1 for c in self.concurrencies):
            raise ConfigError("sweep: rates must be positive and concurrencies at least 1")

    @property
    def mode(self) -> str:
        return "rates" if self.request_rates else "concurrencies" if self.concurrencies else "slo-search"


def meets_slo(row: dict, slo: dict[str, float]) -> bool:
    """No early stop, no failure, and every p99 within its limit."""
    if row.get("stopped_early") or row.get("failed") or not row.get("completed"):
        return False
    return all((row.get(f"p99_{k}_ms") or 0.0) <= limit for k, limit in slo.items())


class Session:
    """Open clients to every target, first contact done once; runs load points."""

    def __init__(self, cfg: ServeBenchConfig, urls: list[str], rounds: int, on_event: ServeCallback | None) -> None:
        self.cfg, self.urls, self.rounds, self.on_event = cfg, urls, rounds, on_event
        self.records: list[dict] = []

    async def __aenter__(self) -> Session:
        self._stack = contextlib.AsyncExitStack()
        self.clients = [await self._stack.enter_async_context(open_client(self.cfg, u)) for u in self.urls]
        self.infos = [await first_contact(c, u, self.cfg.model, self.cfg.endpoint) for c, u in zip(self.clients, self.urls)]
        return self

    async def __aexit__(self, *exc) -> None:
        await self._stack.aclose()

    async def point(self, cfg: ServeBenchConfig, label: str, active: list[int] | None = None,
                    stop_rule=None) -> list[dict]:
        """One load point on the active targets, in alternating rounds; one row per target."""
        active = list(range(len(self.urls))) if active is None else active
        requests = await asyncio.to_thread(make_workload, cfg, self.infos[active[0]])
        times = cfg.send_times(len(requests))
        runs = {i: TargetRuns(self.urls[i]) for i in active}
        watches = {i: ServerWatch(self.clients[i]) for i in active}
        for w in watches.values():
            await w.start()
        slices = round_slices(len(requests), self.rounds if len(active) > 1 else 1)
        for k, part in enumerate(slices):
            for j in round_order(k, len(active)):
                i = active[j]
                if runs[i].stopped:
                    continue
                self._event("start", {"total": part.stop - part.start, "target": self.urls[i],
                                      "label": f"{label} {self.urls[i]}", "key": (label, i)})
                sub_times = None if times is None else [t - times[part.start] for t in times[part]]
                out = await run_load(self.clients[i], cfg.endpoint, self.infos[i].model, requests[part], sub_times,
                                     cfg.load_config(), target=self.urls[i], stop_rule=stop_rule,
                                     first_index=part.start, on_result=self._on_result((label, i)))
                runs[i].add_round(out.results, out.stopped)
        for w in watches.values():
            await w.stop()
        return self._rows(cfg, label, requests, runs, watches)

    def _rows(self, cfg, label, requests, runs, watches) -> list[dict]:
        rows, summaries = [], []
        for i, run in runs.items():
            s = run.summary(percentile_metrics=cfg.percentile_metrics, percentiles=cfg.metric_percentiles,
                            goodput=cfg.goodput or None)
            s.update(point=label, base_url=self.urls[i], model_id=self.infos[i].model, request_rate=cfg.request_rate,
                     max_concurrency=cfg.max_concurrency, stopped_early=run.stopped, server_metrics=watches[i].report())
            rows.append(s)
            summaries.append(s)
            self.records += [{**request_record(r, requests[r.index]), "point": label} for r in run.results]
        if len(runs) > 1:
            comparison = compare(list(runs.values()), summaries, seed=cfg.seed)
            for s in rows:
                s["comparison"] = [c for c in comparison if c["target"] == s["base_url"]]
        return rows

    def _event(self, event: str, info: dict) -> None:
        if self.on_event:
            self.on_event(event, info)

    def _on_result(self, key):
        def on_result(res, state) -> None:
            self._event("result", {"result": res, "state": state, "key": key})
        return on_result


def _point_cfg(cfg: ServeBenchConfig, k: int, **changes) -> ServeBenchConfig:
    return dataclasses.replace(cfg, seed=cfg.seed + k, **changes)


async def run_sweep(cfg: ServeBenchConfig, sweep: SweepConfig, urls: list[str],
                    on_event: ServeCallback | None = None) -> dict:
    if 99.0 not in cfg.metric_percentiles:
        cfg = dataclasses.replace(cfg, metric_percentiles=(*cfg.metric_percentiles, 99.0))
    rows: list[dict] = []
    async with Session(cfg, urls, sweep.ab_rounds, on_event) as session:
        if sweep.mode == "concurrencies":
            for k, c in enumerate(sweep.concurrencies):
                rows += await session.point(_point_cfg(cfg, k, max_concurrency=c, request_rate=math.inf), f"c={c}")
        elif sweep.mode == "rates":
            rows = await _rate_sweep(session, cfg, sweep)
        else:
            for i in range(len(urls)):
                rows += await _slo_search(session, cfg, sweep, i)
        records = session.records
    best = {u: _best(rows, u, sweep.slo) for u in urls} if sweep.slo else None
    return {"mode": sweep.mode, "slo_ms": sweep.slo or None, "targets": urls, "rows": rows, "best": best,
            "config": cfg.to_dict(), "sweep": dataclasses.asdict(sweep), "requests": records}


async def _rate_sweep(session: Session, cfg: ServeBenchConfig, sweep: SweepConfig) -> list[dict]:
    rows: list[dict] = []
    active = list(range(len(session.urls)))
    for k, rate in enumerate(sorted(sweep.request_rates)):
        rule = saturation_rule(rate, min_seconds=sweep.saturation_after_s)
        point = await session.point(_point_cfg(cfg, k, request_rate=rate), f"{rate:g} req/s", active, rule)
        rows += point
        active = [i for i, row in zip(active, point) if not row["stopped_early"]]
        if not active:
            break
    return rows


async def _slo_search(session: Session, cfg: ServeBenchConfig, sweep: SweepConfig, i: int) -> list[dict]:
    rows = await session.point(_point_cfg(cfg, 0, request_rate=math.inf), "capacity", [i])
    lo, hi = 0.0, rows[0]["request_throughput"] or 0.0
    for k in range(1, sweep.search_steps + 1):
        rate = (lo + hi) / 2
        if rate <= 0:
            break
        rule = saturation_rule(rate, min_seconds=sweep.saturation_after_s)
        row = (await session.point(_point_cfg(cfg, k, request_rate=rate), f"{rate:.3g} req/s", [i], rule))[0]
        rows.append(row)
        lo, hi = (rate, hi) if meets_slo(row, sweep.slo) else (lo, rate)
    return rows


def _best(rows: list[dict], url: str, slo: dict[str, float]) -> dict | None:
    ok = [r for r in rows if r["base_url"] == url and math.isfinite(r["request_rate"]) and meets_slo(r, slo)]
    if not ok:
        return None
    top = max(ok, key=lambda r: r["request_rate"])
    return {"request_rate": top["request_rate"], "p99_ttft_ms": top.get("p99_ttft_ms"),
            "p99_tpot_ms": top.get("p99_tpot_ms"), "request_throughput": top["request_throughput"]}


async def run_ab(cfg: ServeBenchConfig, urls: list[str], rounds: int, on_event: ServeCallback | None = None) -> dict:
    """One load point on several targets, interleaved: side-by-side metrics and ratios."""
    async with Session(cfg, urls, rounds, on_event) as session:
        rows = await session.point(cfg, "ab")
        records = session.records
    return {"mode": "ab", "targets": urls, "rows": rows, "comparison": [c for r in rows for c in r.get("comparison", [])],
            "config": cfg.to_dict(), "requests": records}
