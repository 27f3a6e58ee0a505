"""GuideLLM (the `peer` extra, not a dependency) as a second opinion on `llmctl bench
serve`: its command line for constant arrivals with fixed lengths, and its report read in
vLLM's metric names. GuideLLM's "inter-token latency" is vLLM's TPOT ((latency - TTFT) /
(output tokens - 1)); its own "time per output token" divides the whole latency by every
token, so it is not the one compared."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def guidellm_command(url: str, model: str, tokenizer_dir: str | Path, rate: float, num: int, input_len: int,
                     output_len: int, out: str | Path, api_key: str | None = None,
                     endpoint: str = "/v1/completions") -> list[str]:
    backend = f"kind=openai_http,target={url},model={model},request_format={endpoint}"
    if api_key:
        backend += f",api_key={api_key}"
    return [sys.executable, "-m", "guidellm", "run", "--backend", backend, "--profile", f"kind=constant,rate={rate}",
            "--data", f"kind=synthetic_text,prompt_tokens={input_len},output_tokens={output_len}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer_dir}", "--constraint", f"kind=max_requests,count={num}",
            "--output", f"kind=json,path={out}", "--disable-progress"]


def read_guidellm(path: str | Path) -> dict:
    """The first benchmark of a GuideLLM JSON report, with `llmctl bench serve`'s keys."""
    bench = json.loads(Path(path).read_text())["benchmarks"][0]
    m = bench["metrics"]
    done = m["request_totals"]["successful"]
    totals = m["request_totals"]
    return {"request_throughput": done / bench["duration"], "completed": done, "duration_s": bench["duration"],
            "incomplete": totals.get("incomplete"), "errored": totals.get("errored"),
            "median_ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
            "median_tpot_ms": m["inter_token_latency_ms"]["successful"]["median"],
            "mean_prompt_len": m["prompt_token_count"]["successful"]["mean"],
            "mean_output_len": m.get("output_token_count", {}).get("successful", {}).get("mean")}
