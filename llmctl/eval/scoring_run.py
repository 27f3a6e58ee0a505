"""`ModelRun`: one model's part of an eval: open its backend (engine or server), score the
windows and the tasks, turn the scores into metrics; a candidate also against the baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmctl.eval import gate
from llmctl.eval.stats import kld_stats, perplexity_stats


def _quantization(model_dir: Path | None) -> dict | None:
    if model_dir is None:
        return None
    cfg = None
    if (model_dir / "quantize_config.json").is_file():
        cfg = json.loads((model_dir / "quantize_config.json").read_text())
    elif (model_dir / "config.json").is_file():
        cfg = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if not cfg:
        return None
    return {k: cfg.get(k) for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")}


class ModelRun:
    def __init__(self, plan, name: str, model_dir: Path | None, tokenizer, windows, tasks: dict, stage) -> None:
        self.plan, self.name, self.model_dir = plan, name, model_dir
        self.tokenizer, self.windows, self.tasks, self.stage = tokenizer, windows, tasks, stage
        self.metrics: dict = {}
        self.details: dict = {}
        self.identity: dict = {"name": name, "model_dir": str(model_dir) if model_dir else None,
                               "quantization": _quantization(model_dir)}
        self.rows: dict | None = None  # baseline: per-token rows for KLD
        self.tokens: dict | None = None  # candidate: per-token kld / same_top1 (plots)
        self.checks: list[gate.Check] = []
        self.seconds = 0.0
        self.cache: dict | None = None
        self._backend = None

    # ---- backend -----------------------------------------------------------------
    def backend(self):
        if self._backend is None:
            if self.plan.base_url:
                from llmctl.eval.server_backend import ServerBackend

                self._backend = ServerBackend(self.plan.base_url, self.name, self.tokenizer, self.plan.api_key)
            else:
                from llmctl.eval.backends import EngineBackend
                from llmctl.llm import LLM

                advance = self.stage(f"{self.name}: loading", 1)
                self._backend = EngineBackend(LLM(str(self.model_dir), **self.plan.engine_args))
                advance(1)
            self.identity.update(self._backend.describe())
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _progress(self, what: str, total: int):
        return self.stage(f"{self.name}: {what}", total)

    # ---- runs --------------------------------------------------------------------
    def run_baseline(self) -> None:
        start = time.perf_counter()
        try:
            if "kld" in self.tasks:
                self.rows = self._baseline_rows()
                self.metrics.update(perplexity_stats(self.rows["logprob"]))
            elif "ppl" in self.tasks:
                self._window_scores(None)
            self._accuracy_tasks()
        finally:
            self.close()
        self.seconds = time.perf_counter() - start

    def run_candidate(self, base: "ModelRun | None") -> None:
        start = time.perf_counter()
        try:
            if "ppl" in self.tasks or "kld" in self.tasks:
                scores = self._window_scores(base.rows if base is not None and "kld" in self.tasks else None)
                if base is not None and "ppl" in base.metrics:
                    self.metrics["ppl_base"] = base.metrics["ppl"]
                    self.metrics["ppl_increase"] = self.metrics["ppl"] / base.metrics["ppl"] - 1.0
                if "kld" in scores:
                    self.metrics.update({k: v for k, v in kld_stats(
                        scores["kld"], base.rows["logprob"], scores["logprob"], scores["same_top1"]).items()
                        if k != "num_tokens"})
                    self.tokens = {"kld": scores["kld"], "same_top1": scores["same_top1"],
                                   "position": self._positions()}
            self._accuracy_tasks()
        finally:
            self.close()
        if base is not None:
            for task, key in self._accuracy_keys().items():
                if key in self.metrics and base.metrics.get(key):
                    self.metrics[f"{task}_recovery"] = self.metrics[key] / base.metrics[key]
        self.checks = gate.gate_checks(self.metrics, self.plan.config) if base is not None else []
        self.seconds = time.perf_counter() - start

    # ---- pieces ------------------------------------------------------------------
    def _window_scores(self, base_rows: dict | None) -> dict:
        advance = self._progress("windows" if base_rows is None else "windows + KLD", self.windows.ids.shape[0])
        scores = self.backend().window_scores(self.windows, base_rows, advance)
        self.metrics.update(perplexity_stats(scores["logprob"]))
        return scores

    def _positions(self) -> torch.Tensor:
        """The position in its window of every scored token (for the top-1 vs position plot)."""
        length = self.windows.ids.shape[1]
        return torch.cat([torch.arange(first, length) for first in self.windows.score_from])

    def _baseline_rows(self) -> dict:
        from llmctl.eval import baseline_cache

        plan, cfg = self.plan, self.plan.config
        key = path = None
        if plan.use_cache:
            dtype, device_kind = self._planned_dtype()
            key = baseline_cache.cache_key(self.model_dir, self.windows.digest(), cfg.kld_top_k, dtype, device_kind)
            path = baseline_cache.cache_path(plan.baseline_cache_dir, key)
            rows = baseline_cache.load(path)
            if rows is not None:
                self.cache = {"path": str(path), "hit": True, "weights_sha256": key["weights"]}
                return rows
        kept = f"top-{cfg.kld_top_k}" if cfg.kld_top_k else "whole rows"
        advance = self._progress(f"baseline rows ({kept})", self.windows.ids.shape[0])
        rows = self.backend().baseline_rows(self.windows, cfg.kld_top_k, advance)
        if path is not None:
            baseline_cache.save(path, rows, key)
            self.cache = {"path": str(path), "hit": False, "weights_sha256": key["weights"]}
        return rows

    def _planned_dtype(self) -> tuple[str, str]:
        """The dtype and device kind the engine will pick, without loading it (the cache key)."""
        from llmctl.models.arch import load_arch, resolve_dtype
        from llmctl.models.loader import resolve_device

        device = resolve_device(self.plan.engine_args.get("device", "auto"))
        kind = "gpu" if device.type == "cuda" else "cpu"
        return resolve_dtype(self.plan.engine_args.get("dtype", "auto"), load_arch(self.model_dir), kind), kind

    def _accuracy_keys(self) -> dict[str, str]:
        keys = {"cloze": "cloze_acc"} if "cloze" in self.tasks else {}
        keys.update({name: f"{name}_acc" for name, task in self.tasks.items() if task is not None})
        return keys

    def _accuracy_tasks(self) -> None:
        from llmctl.eval.cloze import cloze_docs, cloze_metrics, cloze_requests
        from llmctl.eval.multiple_choice import mc_metrics, mc_requests

        cfg = self.plan.config
        if "cloze" in self.tasks:
            requests = cloze_requests(self.tokenizer, cloze_docs(cfg.limit))
            results = self.backend().loglikelihood(requests, self._progress("cloze", len(requests)))
            self.metrics.update(cloze_metrics(results))
        for name, task in self.tasks.items():
            if task is None:
                continue
            requests = mc_requests(self.tokenizer, task)
            results = self.backend().loglikelihood(requests, self._progress(name, len(requests)))
            metrics, details = mc_metrics(task, results)
            self.metrics.update(metrics)
            self.details[name] = details
