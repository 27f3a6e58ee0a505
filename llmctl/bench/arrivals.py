"""When each request of `llmctl bench serve` is sent: send times in seconds from the start,
a pure function of the arrival config, the number of requests and the seed.

- `poisson`: exponential gaps of mean 1/rate (a gamma process of shape 1).
- `gamma`: gaps drawn from Gamma(shape=burstiness, scale=1/(rate * burstiness)), mean 1/rate
  as vLLM draws them: burstiness < 1 sends in bursts, > 1 more evenly (coefficient of
  variation 1/sqrt(burstiness)).
- `constant`: gaps of exactly 1/rate.
- A ramp-up (`linear` or `exponential`) moves the rate from `ramp_up_start_rps` to
  `ramp_up_end_rps` over the requests, each gap drawn at the rate of its request.
- An infinite rate sends everything at time 0 (`max_concurrency` then paces the load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmctl.errors import ConfigError

PROCESSES = ("poisson", "gamma", "constant")
RAMPS = ("linear", "exponential")


@dataclass(frozen=True)
class ArrivalConfig:
    request_rate: float = math.inf  # requests/s
    process: str = "poisson"
    burstiness: float = 1.0
    ramp_up: str | None = None  # linear | exponential
    ramp_up_start_rps: float | None = None
    ramp_up_end_rps: float | None = None

    def __post_init__(self) -> None:
        if self.process not in PROCESSES:
            raise ConfigError(f"--arrival: must be one of {', '.join(PROCESSES)}, got {self.process!r}")
        if not self.request_rate > 0:
            raise ConfigError(f"--request-rate: must be positive, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ConfigError(f"--burstiness: must be a positive number, got {self.burstiness}")
        if self.burstiness != 1.0 and self.process != "gamma":
            raise ConfigError("--burstiness: only with --arrival gamma",
                              hint="poisson is gamma with burstiness 1; constant has none")
        if self.ramp_up is not None:
            if self.ramp_up not in RAMPS:
                raise ConfigError(f"--ramp-up-strategy: must be linear or exponential, got {self.ramp_up!r}")
            start, end = self.ramp_up_start_rps, self.ramp_up_end_rps
            if start is None or end is None or not (0 < start and 0 < end and math.isfinite(start + end)):
                raise ConfigError("--ramp-up-strategy: needs positive --ramp-up-start-rps and --ramp-up-end-rps")

    def rates(self, n: int) -> np.ndarray:
        """The rate each request's gap is drawn at (requests/s)."""
        if self.ramp_up is None:
            return np.full(n, self.request_rate, dtype=float)
        frac = np.arange(n) / max(1, n - 1)
        start, end = self.ramp_up_start_rps, self.ramp_up_end_rps
        if self.ramp_up == "linear":
            return start + (end - start) * frac
        return start * (end / start) ** frac

    def describe(self) -> str:
        if self.ramp_up:
            return f"{self.process}, {self.ramp_up} ramp {self.ramp_up_start_rps:g} -> {self.ramp_up_end_rps:g} req/s"
        if not math.isfinite(self.request_rate):
            return "all at once"
        burst = f", burstiness {self.burstiness:g}" if self.process == "gamma" else ""
        return f"{self.process} at {self.request_rate:g} req/s{burst}"


def arrival_times(cfg: ArrivalConfig, n: int, seed: int) -> np.ndarray:
    """Send times of n requests, seconds from the start; the first is sent at 0."""
    rates = cfg.rates(n)
    if n == 0:
        return np.zeros(0)
    if not np.isfinite(rates).all():
        return np.zeros(n)
    rng = np.random.default_rng([seed, 0xA11])
    if cfg.process == "constant":
        gaps = 1.0 / rates
    else:
        shape = cfg.burstiness if cfg.process == "gamma" else 1.0
        gaps = rng.gamma(shape, 1.0 / (rates * shape))
    # Request i waits the gap drawn at its own rate; the first goes at once.
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])
