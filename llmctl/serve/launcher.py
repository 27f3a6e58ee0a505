"""From resolved settings (`llmctl.settings`) to a running server: the app around a loaded
`LLMEngine`. The CLI and the tests build servers the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmctl.config import ServeConfig


def build_app(engine: Any, serve_config: ServeConfig, served_model_name: str | None = None,
              model_arg: str | None = None):
    """The FastAPI app serving a loaded `LLMEngine`; the engine thread starts with the app."""
    from llmctl.engine.async_engine import AsyncEngine
    from llmctl.serve.api_server import create_app
    from llmctl.serve.chat_template import load_chat_template
    from llmctl.serve.metrics import ServerMetrics
    from llmctl.serve.serving_common import ServingContext

    chosen = served_model_name or serve_config.served_model_name
    names = [chosen or engine.model_name]
    alias = model_arg or engine.config.model.model
    if not chosen and alias not in names:
        names.append(alias)  # `llmctl serve ./dir` answers to `./dir` as vLLM does; `llmctl serve` to "default"
    metrics = ServerMetrics(names[0])
    scheduler = engine.config.scheduler
    async_engine = AsyncEngine(engine, max_num_unfinished=scheduler.max_num_seqs + scheduler.max_waiting,
                               step_hook=metrics.record_step, abort_hook=metrics.record_abort)
    ctx = ServingContext(
        engine=async_engine, tokenizer=engine.tokenizer, served_model_names=names,
        model_path=str(engine.model_dir) if engine.model_dir else engine.model_name,
        max_model_len=engine.max_model_len, vocab_size=engine.arch.vocab_size, max_num_seqs=scheduler.max_num_seqs,
        generation_defaults=dict(getattr(engine, "generation_defaults", {})),
        chat_template=load_chat_template(serve_config.chat_template))
    return create_app(ctx, metrics, serve_config)


def model_dir_of(engine: Any) -> Path | None:
    return Path(engine.model_dir) if getattr(engine, "model_dir", None) else None
