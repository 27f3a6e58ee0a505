"""`quantize_checkpoint`: a model dir in, a GPTQ checkpoint dir out (what `llmctl quantize` runs).

Order of work: validate everything that can be checked without weights (so bad
input fails before any work), load, calibrate, quantize layer by layer while
streaming packed tensors into a temp dir, commit atomically, then `llmctl eval`'s
check against the source (perplexity and KLD on held-out text), whose report lands in
`llmctl_eval.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from llmctl.config import EVAL_FILE, EvalConfig, GPTQConfig, QuantConfig
from llmctl.errors import QuantizationError

# (stage, done, total) for loading / calibration / eval; layers report through on_layer.
StageCallback = Callable[[str, int, int], None]


@dataclass
class QuantizeSummary:
    source: str
    output: str
    bits: int
    group_size: int
    checkpoint_format: str
    num_samples: int
    seq_len: int
    device: str
    seconds: float  # wall time of the whole run, the accuracy check included
    source_bytes: int
    output_bytes: int
    peak_memory_bytes: int
    layer_losses: list[dict[str, float]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # load, calibration, gptq, write, check
    eval: dict | None = None

    @property
    def compression(self) -> float:
        return self.source_bytes / max(self.output_bytes, 1)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["compression"] = round(self.compression, 3)
        return d


def validate_request(model_dir: Path, out_dir: Path, config: QuantConfig, overwrite: bool) -> dict:
    """Every check that needs no weights; returns the source config.json. Raises on bad input."""
    from llmctl.models.arch import arch_from_config, read_config_json
    from llmctl.quant.calibration import check_dataset
    from llmctl.quant.checkpoint import check_output_dir
    from llmctl.quant.packing import check_packable

    cfg = read_config_json(model_dir)
    arch = arch_from_config(cfg, source=str(model_dir / "config.json"))
    if arch.is_gptq:
        raise QuantizationError(f"{model_dir} is already GPTQ-quantized", hint="quantize the original 16/32-bit model")
    check_output_dir(out_dir, overwrite, source_dir=model_dir)
    check_dataset(config.dataset)
    for name, k, n in arch.linear_shapes():
        check_packable(name, k, n, config.gptq.bits, config.gptq.group_size)
    if config.gptq.lm_head:
        raise QuantizationError("lm_head quantization is not supported yet", hint="leave lm_head: false")
    return cfg


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _peak_memory(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def checkpoint_config(config: QuantConfig) -> GPTQConfig:
    """The GPTQ config the checkpoint records: format v1 for a symmetric grid, v2 otherwise."""
    from llmctl.quant.packing import format_for

    return replace(config.gptq, checkpoint_format=format_for(config.gptq.sym))


def _load_and_calibrate(model_dir: Path, config: QuantConfig, dev, stage: StageCallback):
    """(tokenizer, model on the CPU, calibration ids [n, S]). GPU runs keep fp16 weights."""
    import torch

    from llmctl.models.loader import load_model, load_tokenizer
    from llmctl.quant.calibration import calibration_batch, load_calibration_texts

    stage("load", 0, 1)
    tokenizer = load_tokenizer(model_dir)
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    model = load_model(model_dir, dtype=dtype, device="cpu")
    stage("load", 1, 1)
    seq_len = min(config.seq_len, model.arch.max_position_embeddings)
    stage("calibration", 0, 1)
    calib_ids = calibration_batch(tokenizer, load_calibration_texts(config.dataset), config.num_samples,
                                  seq_len, config.seed)
    stage("calibration", 1, 1)
    return tokenizer, model, calib_ids


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, config: QuantConfig, device: str = "auto",
                        overwrite: bool = False, run_eval: bool = True, on_stage: StageCallback | None = None,
                        on_layer=None, eval_config: EvalConfig | None = None,
                        max_shard_bytes: int | None = None) -> QuantizeSummary:
    """Quantize `model_dir` into `out_dir` (see the module docstring)."""
    import torch

    from llmctl.models.loader import resolve_device
    from llmctl.quant.checkpoint import CheckpointWriter
    from llmctl.quant.driver import quantize_model_layers
    from llmctl.quant.packing import pack_result
    from llmctl.quant.source import copy_unquantized_tensors

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = validate_request(model_dir, out_dir, config, overwrite)
    dev = resolve_device(device)
    stage = on_stage or (lambda *_: None)
    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    stage_seconds: dict[str, float] = {}

    def timed(name: str, done: int, total: int) -> None:
        stage(name, done, total)
        if name in ("load", "calibration") and done == total:
            stage_seconds[name] = round(time.perf_counter() - start - sum(stage_seconds.values()), 2)

    tokenizer, model, calib_ids = _load_and_calibrate(model_dir, config, dev, timed)
    gptq_start = time.perf_counter()
    seq_len = calib_ids.shape[1]
    qconfig = checkpoint_config(config)
    fmt = qconfig.checkpoint_format
    batch_size = max(1, 4096 // seq_len)
    shard_limit = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    with CheckpointWriter(out_dir, overwrite=overwrite, **shard_limit) as writer:
        def sink(name, result):
            writer.add(pack_result(result, qconfig.bits, fmt).tensors(name))

        stats = quantize_model_layers(model, calib_ids, qconfig, sink, device=dev,
                                      true_sequential=qconfig.true_sequential, batch_size=batch_size,
                                      on_layer=on_layer)
        stage_seconds["gptq"] = round(time.perf_counter() - gptq_start, 2)
        write_start = time.perf_counter()
        copy_unquantized_tensors(model_dir, writer)
        summary = QuantizeSummary(
            source=str(model_dir), output=str(out_dir.resolve()), bits=qconfig.bits, group_size=qconfig.group_size,
            checkpoint_format=fmt, num_samples=config.num_samples, seq_len=seq_len, device=str(dev),
            seconds=0.0, source_bytes=_dir_bytes(model_dir), output_bytes=0,
            peak_memory_bytes=_peak_memory(dev), layer_losses=[r.losses for r in stats.layers],
        )
        writer.commit(model_dir, cfg, qconfig)
    summary.output_bytes = _dir_bytes(out_dir)
    stage_seconds["write"] = round(time.perf_counter() - write_start, 2)
    quantize_seconds = time.perf_counter() - start
    del model
    if run_eval:
        summary.eval = check_quantized(model_dir, out_dir, eval_config or EvalConfig(), dev, stage)
        summary.eval["quantize_seconds"] = round(quantize_seconds, 2)
        (out_dir / EVAL_FILE).write_text(json.dumps(summary.eval, indent=2, default=str))
        stage_seconds["check"] = round(time.perf_counter() - start - quantize_seconds, 2)
    summary.stage_seconds = stage_seconds
    summary.seconds = time.perf_counter() - start
    return summary


def check_quantized(model_dir: Path, out_dir: Path, eval_config: EvalConfig, dev, stage: StageCallback) -> dict:
    """`llmctl eval --baseline SOURCE OUT --tasks ppl,kld` with the recipe's gate: the same code,
    on the engine that will serve the checkpoint. Returns the checkpoint's report."""
    from llmctl.eval.run import EvalPlan, evaluate

    def eval_stage(label: str, total: int):
        done = [0]

        def advance(k: int) -> None:
            done[0] += k
            stage("eval", done[0], total)
        return advance

    tasks = tuple(eval_config.tasks) or ("ppl", "kld")
    if "kld" in tasks and "ppl" not in tasks:
        tasks = ("ppl", *tasks)
    plan = EvalPlan(candidates=(str(out_dir),), baseline=str(model_dir), tasks=tasks, config=eval_config,
                    engine_args={"device": str(dev)})
    return evaluate(plan, stage=eval_stage)["candidates"][0]
