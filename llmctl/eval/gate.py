"""The regression gate: each candidate's metrics against thresholds, PASS or FAIL.

Exit codes of `llmctl eval` (and of `llmctl quantize` when its check fails):
0 every gate passed (or there was nothing to gate), 1 an error, `EXIT_GATE_FAILED` (3) a
candidate failed its gate. 2 stays Click's usage error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXIT_GATE_FAILED = 3


@dataclass(frozen=True)
class Check:
    metric: str  # a key of the candidate's metrics
    op: str  # "<=" | ">="
    threshold: float
    value: float | None  # None: not measured (the check is then skipped, not failed)

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def gate_checks(metrics: dict, config) -> list[Check]:
    """The checks `config` (an EvalConfig) asks for, on one candidate's flat metrics dict."""
    checks = []
    if config.max_ppl_increase is not None and "ppl_increase" in metrics:
        checks.append(Check("ppl_increase", "<=", config.max_ppl_increase, metrics["ppl_increase"]))
    if config.max_kld is not None and "kld_mean" in metrics:
        checks.append(Check("kld_mean", "<=", config.max_kld, metrics["kld_mean"]))
    if config.min_top1_agreement is not None and "same_top1" in metrics:
        checks.append(Check("same_top1", ">=", config.min_top1_agreement, metrics["same_top1"]))
    if config.min_recovery is not None:
        for key in sorted(k for k in metrics if k.endswith("_recovery")):
            checks.append(Check(key, ">=", config.min_recovery, metrics[key]))
    return checks


def verdict(checks: list[Check]) -> bool | None:
    """True: every measured check passed; False: one failed; None: nothing was checked."""
    results = [c.passed for c in checks if c.passed is not None]
    if not results:
        return None
    return all(results)


def failing(checks: list[Check]) -> list[str]:
    return [f"{c.metric} {c.value:.4g} (limit {c.op} {c.threshold:g})" for c in checks if c.passed is False]
