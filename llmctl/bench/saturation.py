"""When a server is over-saturated: requests arrive faster than it finishes them, so the
requests in flight keep growing and each new request waits longer for its first token.
A run at such a rate has no steady state to measure; the sweep stops it early.

The rule, checked while requests are still being sent and after `min_seconds`: over the
later half of the run so far, the number in flight grows (least-squares slope above
`min_growth` of the offered rate and two standard errors above zero), and the TTFT of
finished requests climbs with their send time (or nothing finishes at all).
"""

from __future__ import annotations

import math

import numpy as np

from llmctl.bench.loadgen import LiveState, StopRule


def slope(x, y) -> tuple[float, float]:
    """Least-squares slope of y on x and its standard error."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 3 or np.ptp(x) == 0:
        return 0.0, math.inf
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid * resid).sum()) / (x.size - 2) / float((xc * xc).sum()))
    return b, se


def saturation_rule(offered_rate: float, min_seconds: float = 5.0, min_growth: float = 0.1,
                    min_in_flight: int = 4) -> StopRule:
    def rule(state: LiveState) -> str | None:
        if not state.dispatching or state.elapsed < min_seconds or state.in_flight < min_in_flight:
            return None
        recent = [(t, q) for t, q in state.timeline if t >= state.elapsed / 2]
        growth, se = slope(*zip(*recent)) if len(recent) >= 4 else (0.0, math.inf)
        if not (growth > 2 * se and growth > min_growth * offered_rate):
            return None
        done = [(r.send_time, r.ttft) for r in state.finished if r.success and not r.warmup]
        if len(done) >= 4:
            climb, climb_se = slope(*zip(*done))
            if not climb > 2 * climb_se:
                return None
            why = f"TTFT climbing {1000 * climb:.0f} ms per second of the run"
        else:
            why = f"only {len(done)} finished"
        return (f"over-saturated after {state.elapsed:.1f} s: {state.in_flight} requests in flight, "
                f"growing {growth:.1f}/s; {why}")

    return rule
