"""GuideLLM and `llmctl bench serve` against one running server, one after the other, at the
same constant rate with the same fixed lengths: request throughput, median TTFT and median
TPOT of each, and their ratios (the issue asks for 10%); `--rounds N` alternates the order.
For a quiet machine (a GPU host); on a busy one, tests/test_bench_serve_peer.py runs both
at once.

    python benchmarks/serve_peer.py --base-url http://127.0.0.1:8001 --output-json peer.json
GuideLLM can come from another folder (`--peer-path`, put first on its PYTHONPATH)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmctl.bench.peer import guidellm_command, read_guidellm
from llmctl.bench.serve_client import ServeBenchConfig, benchmark
from llmctl.models.default import default_model_dir

KEYS = ("request_throughput", "median_ttft_ms", "median_tpot_ms", "completed", "mean_prompt_len", "mean_output_len",
        "incomplete", "errored")


def run_guidellm(args, model: str, out: Path) -> dict:
    cmd = guidellm_command(args.base_url, model, args.tokenizer, args.rate, args.num, args.input_len,
                           args.output_len, out, api_key=args.api_key)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.peer_path:
        env["PYTHONPATH"] = os.pathsep.join([args.peer_path, env.get("PYTHONPATH", "")])
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"guidellm failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"guidellm: {time.time() - t0:.1f} s with its start", file=sys.stderr)
    return read_guidellm(out)


def run_llmctl(args, model: str, seed: int) -> dict:
    s = benchmark(ServeBenchConfig(base_url=args.base_url, model=model, api_key=args.api_key, num_prompts=args.num,
                                   input_len=args.input_len, output_len=args.output_len, request_rate=args.rate,
                                   arrival="constant", seed=seed))
    return {k: s.get(k) for k in KEYS if k in s} | {"mean_prompt_len": s["workload"]["mean_prompt_len"],
                                                     "mean_output_len": s["total_output_tokens"] / max(1, s["completed"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", help="served model name (default: the first listed)")
    ap.add_argument("--api-key")
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--num", type=int, default=40)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=str(default_model_dir()), help="GuideLLM's tokenizer dir")
    ap.add_argument("--peer-path", help="folder with GuideLLM, first on its PYTHONPATH")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each client, the order reversed every round (GuideLLM repeats its prompts: "
                         "more than one round wants a server without the prefix cache)")
    ap.add_argument("--timeout", type=float, default=80.0, help="seconds for one GuideLLM run")
    ap.add_argument("--output-json", type=Path)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    runs: dict[str, list[dict]] = {"guidellm": [], "llmctl": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for who in ("guidellm", "llmctl") if k % 2 == 0 else ("llmctl", "guidellm"):
                run = (run_guidellm(args, model, Path(tmp) / f"guidellm{k}.json") if who == "guidellm"
                       else run_llmctl(args, model, args.seed + k))
                runs[who].append(run)
                print(f"round {k} {who}:", json.dumps(run), flush=True)  # kept if a later run is cut short
    mean = {who: {k: sum(r[k] for r in rs) / len(rs) for k in KEYS if all(r.get(k) is not None for r in rs)}
            for who, rs in runs.items()}
    ratios = {k: mean["llmctl"][k] / mean["guidellm"][k] for k in KEYS[:3] if mean["guidellm"].get(k)}
    print(f"constant {args.rate:g} req/s, {args.num} requests of {args.input_len} prompt / {args.output_len} output "
          f"tokens, {args.base_url} ({model}); {args.rounds} round(s), one client at a time, GuideLLM first in "
          f"even rounds; means over the rounds")
    print(f"{'metric':<20} {'GuideLLM':>10} {'llmctl':>10} {'llmctl/GuideLLM':>16}")
    for k in KEYS:
        g, o = mean["guidellm"].get(k), mean["llmctl"].get(k)
        r = f"{ratios[k]:.3f}" if k in ratios else ""
        g, o = ("-" if v is None else f"{v:.2f}" for v in (g, o))
        print(f"{k:<20} {g:>10} {o:>10} {r:>16}")
    if args.output_json:
        args.output_json.write_text(json.dumps({"config": vars(args) | {"output_json": str(args.output_json)},
                                                "model": model, "runs": runs, "mean": mean, "ratios": ratios},
                                               indent=1))


if __name__ == "__main__":
    main()
