"""`llmctl bench serve` against a real `llmctl serve` subprocess (the default model, small
counts): arrival processes, exact prompt lengths, warm-up, metrics recomputed by hand from
the per-request JSON, and the errors a new user meets first."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from bench_serve_helpers import API_KEY, free_port, ks_distance, percentile, run_cli, servers, start_server, wait_up

from llmctl.bench.arrivals import ArrivalConfig, arrival_times
from llmctl.bench.serve_client import ServeBenchConfig, benchmark


@pytest.fixture(scope="module")
def tiny_gptq(tmp_path_factory):
    """Random 4-bit weights of a tiny recipe (`serve --load-format dummy --quantization gptq`),
    started first so that it loads while the other two do."""
    tmp = tmp_path_factory.mktemp("tiny")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    proc, url = start_server(tmp / "serve.log", "--load-format", "dummy", "--quantization", "gptq", model=str(recipe))
    try:
        yield proc, url, tmp / "serve.log"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_gptq):
    """Two servers, loaded in parallel: the second runs one sequence at a time."""
    with servers(tmp_path_factory.mktemp("bench"), ("--max-num-seqs", "8"), ("--max-num-seqs", "1")) as urls:
        yield urls


@pytest.fixture(scope="module")
def server(both):
    return both[0]


def _cfg(url: str, **kw) -> ServeBenchConfig:
    base = dict(base_url=url, api_key=API_KEY, num_prompts=6, input_len=8, output_len=2, seed=1)
    return ServeBenchConfig(**{**base, **kw})


@pytest.mark.parametrize("process,burstiness", [("poisson", 1.0), ("gamma", 0.1), ("constant", 1.0)])
def test_arrival_process_produces_its_distribution(server, process, burstiness):
    """The gaps between the real send times follow the process: a two-sample KS test
    against 100,000 draws of the intended distribution passes, and the one against an
    exponential tells the processes apart (seeded: the same schedule every run)."""
    rate, n, seed = 10.0, 60, 9
    cfg = _cfg(server, num_prompts=n, request_rate=rate, arrival=process, burstiness=burstiness, seed=seed)
    report = benchmark(cfg)
    assert report["failed"] == 0, report["errors"]
    recs = sorted(report["requests"], key=lambda r: r["index"])
    scheduled = np.array([r["scheduled_time"] for r in recs])
    np.testing.assert_allclose(scheduled, arrival_times(cfg.arrival_config(), n, seed))  # a pure function of the seed
    late = np.array([r["send_time"] - r["scheduled_time"] for r in recs])
    assert (late < 0.05).mean() > 0.5, f"the client sent late: {np.round(late, 3)}"
    on_time = late < 0.02
    # A busy machine can stall the client's event loop; gaps between two requests both
    # sent on time are the process's own.
    gaps = np.diff([r["send_time"] for r in recs])[on_time[1:] & on_time[:-1]]
    rng = np.random.default_rng(12345)
    if process == "constant":
        reference = np.full(100_000, 1.0 / rate)
        assert np.median(np.abs(gaps - 1.0 / rate)) < 0.25 / rate, np.round(gaps, 3)
    else:
        reference = rng.gamma(burstiness, 1.0 / (rate * burstiness), 100_000)
    exponential = rng.exponential(1.0 / rate, 100_000)
    critical = 1.95 / math.sqrt(gaps.size)  # alpha = 0.001
    # Compared at 10 ms resolution: a busy event loop moves a send by a few ms, and a
    # bursty process has many gaps far shorter than that.
    gaps, reference, exponential = (np.floor(x / 0.01) for x in (gaps, reference, exponential))
    if process != "constant":
        assert ks_distance(gaps, reference) < critical, f"{process}: gaps do not follow the process"
    if process != "poisson":
        assert ks_distance(gaps, exponential) > critical, f"{process}: indistinguishable from Poisson"


def test_ramp_up_raises_the_rate_over_the_run():
    cfg = ArrivalConfig(process="constant", ramp_up="linear", ramp_up_start_rps=1.0, ramp_up_end_rps=9.0)
    gaps = np.diff(arrival_times(cfg, 5, 0))
    np.testing.assert_allclose(gaps, [1 / 3, 1 / 5, 1 / 7, 1 / 9])
    exp = ArrivalConfig(process="constant", ramp_up="exponential", ramp_up_start_rps=1.0, ramp_up_end_rps=16.0)
    np.testing.assert_allclose(np.diff(arrival_times(exp, 5, 0)), [1 / 2, 1 / 4, 1 / 8, 1 / 16])


def test_prompts_have_exact_token_lengths(server, default_model_dir, tmp_path):
    """The server's own prompt_tokens equal the drawn lengths, with a spread and a shared
    prefix; the server's /tokenize and the local tokenizer build the same workload."""
    cfg = _cfg(server, num_prompts=6, input_len=20, range_ratio=0.5, prefix_len=40, output_len=3, seed=5)
    report = benchmark(cfg)
    recs = report["requests"]
    assert report["completed"] == 6, report["errors"]
    assert [r["prompt_len"] for r in recs] == [r["expected_prompt_len"] for r in recs]
    assert len({r["prompt_len"] for r in recs}) > 1 and all(50 <= r["prompt_len"] <= 70 for r in recs)
    assert all(r["output_len"] == r["requested_output_len"] for r in recs)  # the ratio spreads outputs too
    assert report["server_metrics"]["prefix_cache_hits"] > 0  # the shared prefix is served from the cache
    local = benchmark(ServeBenchConfig(**{**cfg.to_dict(), "api_key": API_KEY, "tokenizer": str(default_model_dir)}))
    assert local["workload"]["digest"] == report["workload"]["digest"]
    other = benchmark(ServeBenchConfig(**{**cfg.to_dict(), "api_key": API_KEY, "seed": 6}))
    assert other["workload"]["digest"] != report["workload"]["digest"]


def test_corpus_and_file_datasets_on_the_chat_endpoint(server, tmp_path):
    corpus = benchmark(_cfg(server, dataset="corpus", endpoint="/v1/chat/completions", num_prompts=3, output_len=2))
    assert corpus["completed"] == 3 and corpus["workload"]["chat_lengths"]["input_mean"] == 161.0
    # The chat template wraps each message, so the server counts more than the text alone.
    assert all(r["prompt_len"] > r["expected_prompt_len"] for r in corpus["requests"])
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Name a color.", "output_len": 2}\n'
                    '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}], '
                    '"output_len": 3}\n')
    report = benchmark(_cfg(server, dataset=str(data), endpoint="/v1/chat/completions", num_prompts=4, output_len=None))
    assert report["completed"] == 4 and sorted(r["output_len"] for r in report["requests"]) == [2, 2, 3, 3]


def test_warmup_excluded_and_metrics_equal_a_hand_computation(server, tmp_path):
    """Run through the CLI; every number of the summary is recomputed from the per-request
    JSON: warm-ups out, duration from the first counted send to the last end."""
    out, csv_path = tmp_path / "run.json", tmp_path / "run.csv"
    proc = run_cli("bench", "serve", "--base-url", server, "--api-key", API_KEY, "--num-prompts", "6",
                   "--num-warmups", "2", "--input-len", "8", "--output-len", "4", "--request-rate", "20",
                   "--goodput", "ttft:1500", "--goodput", "tpot:400", "--metric-percentiles", "50,90,99",
                   "--output-json", str(out), "--output-csv", str(csv_path), "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "Serving Benchmark Result" in proc.stdout
    s = json.loads(out.read_text())
    recs = s["requests"]
    warm, counted = [r for r in recs if r["warmup"]], [r for r in recs if not r["warmup"]]
    assert [r["index"] for r in warm] == [0, 1] and s["warmups"] == 2 and s["completed"] == 6 == len(counted)
    duration = max(r["end_time"] for r in counted) - min(r["send_time"] for r in counted)
    assert s["duration"] == pytest.approx(duration)
    assert min(r["send_time"] for r in counted) > max(r["send_time"] for r in warm)
    ttft = [1000 * r["ttft"] for r in counted]
    tpot = [1000 * (r["latency"] - r["ttft"]) / (r["output_len"] - 1) for r in counted]
    itl = [1000 * x for r in counted for x in r["itl"]]
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        assert s[f"mean_{name}_ms"] == pytest.approx(sum(values) / len(values))
        for p in (50, 90, 99):
            assert s[f"p{p}_{name}_ms"] == pytest.approx(percentile(values, p))
    good = sum(1 for a, b in zip(ttft, tpot) if a <= 1500 and b <= 400)
    assert s["request_goodput"] == pytest.approx(good / duration)
    assert s["request_throughput"] == pytest.approx(6 / duration)
    assert s["total_output_tokens"] == sum(r["output_len"] for r in counted) == 24
    assert len(csv_path.read_text().splitlines()) == 1 + 8


def test_soak_repeats_the_workload_for_the_duration(server):
    """--duration with --max-concurrency: clients stay busy, cycling over a workload of two
    prompts, some hang up on purpose; nothing fails."""
    report = benchmark(_cfg(server, num_prompts=2, input_len=8, output_len=4, max_concurrency=2, duration_s=4.0,
                            disconnect_fraction=0.3, seed=4))
    recs = report["requests"]
    assert len(recs) > 2 and report["failed"] == 0, report["errors"]
    assert report["completed"] + report["disconnected"] == len(recs) and report["completed"] > 0
    assert max(r["send_time"] for r in recs) < 4.0  # nothing is sent after the duration


def test_report_json_is_strict_json(server, tmp_path):
    """An infinite rate is written as "inf": the file parses where Infinity is refused."""
    proc = run_cli("bench", "serve", "--base-url", server, "--api-key", API_KEY, "--num-prompts", "2",
                   "--input-len", "4", "--output-len", "2", "--json")
    assert proc.returncode == 0, proc.stderr

    def refuse(const):
        raise ValueError(const)

    report = json.loads(proc.stdout, parse_constant=refuse)
    assert report["request_rate"] == "inf" and report["config"]["request_rate"] == "inf"


def _one_red_line(proc, *words: str) -> None:
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and lines[1].startswith("hint:") and len(lines) == 2, proc.stderr
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words), proc.stderr


def test_first_contact_errors_are_one_line_with_a_hint(server):
    from concurrent.futures import ThreadPoolExecutor

    nobody = f"http://127.0.0.1:{free_port()}"
    cases = [(("--base-url", nobody), None, ("no server answers", "llmctl serve")),
             (("--base-url", server), None, ("API key", "--api-key")),
             (("--base-url", server.removeprefix("http://")), None, ("http://",)),
             (("--base-url", server, "--model", "nope"), None, ("API key",)),
             (("--base-url", server, "--model", "nope"), {"LLMCTL_API_KEY": API_KEY},
              ("(HTTP 4", "`nope` does not exist", "default"))]
    with ThreadPoolExecutor(len(cases)) as pool:  # separate CLI processes, started at once
        procs = list(pool.map(lambda c: run_cli("bench", "serve", *c[0], env=c[1]), cases))
    for proc, (_, _, words) in zip(procs, cases):
        _one_red_line(proc, *words)


def _assert_png(path) -> None:
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 100 and len(data) > 5000
    import matplotlib.image

    assert matplotlib.image.imread(str(path)).shape[:2] == (height, width)


def test_ab_of_two_servers_prints_a_ratio(both, tmp_path):
    """Both targets get the same prompts in alternating rounds; the table gives the ratio
    of each metric with its bootstrap interval, and the CDF overlay is a valid PNG."""
    out = tmp_path / "ab.json"
    proc = run_cli("bench", "serve", "--base-url", both[0], "--base-url", both[1], "--api-key", API_KEY,
                   "--num-prompts", "4", "--input-len", "12", "--output-len", "3", "--max-concurrency", "2",
                   "--ab-rounds", "2", "--output-json", str(out), "--plot", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    assert "A/B" in proc.stdout and "request_throughput" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["base_url"]: r for r in report["rows"]}
    assert rows[both[0]]["completed"] == rows[both[1]]["completed"] == 4
    by_target = {u: {r["index"]: r["expected_prompt_len"] for r in report["requests"] if r["target"] == u} for u in both}
    assert by_target[both[0]] == by_target[both[1]]
    tput = next(c for c in report["comparison"] if c["metric"] == "request_throughput")
    assert tput["ratio"] == pytest.approx(tput["b"] / tput["a"]) and f"{tput['ratio']:.3f}x" in proc.stdout
    ttft = next(c for c in report["comparison"] if c["metric"] == "median_ttft_ms")
    assert ttft["ci_low"] <= ttft["ci_high"]
    _assert_png(tmp_path / "plots" / "latency_cdf.png")


def test_sweep_ab_table_names_the_point_of_each_ratio():
    """A sweep of two targets prints its ratios per point (two points would otherwise give
    two unlabelled copies of each metric), the metrics a capacity question turns on."""
    from rich.console import Console

    from llmctl.bench.ab import COMPARED
    from llmctl.cli.bench_serve_ab import SWEEP_COMPARED, comparison_table, sweep_comparison

    def row(point, url, comparison):
        return {"point": point, "base_url": url, "comparison": comparison}

    def ratios(k):
        return [{"metric": m, "baseline": "http://a", "target": "http://b", "a": 1.0, "b": k, "ratio": k,
                 "ci_low": None, "ci_high": None} for m, _, _ in COMPARED]

    report = {"targets": ["http://a", "http://b"], "rows": [
        row("8 req/s", "http://a", []), row("8 req/s", "http://b", ratios(1.25)),
        row("16 req/s", "http://a", []), row("16 req/s", "http://b", ratios(1.5))]}
    rows = sweep_comparison(report)
    assert [(r["point"], r["metric"]) for r in rows] == [(p, m) for p in ("8 req/s", "16 req/s") for m in SWEEP_COMPARED]
    console = Console(record=True, width=120)
    console.print(comparison_table(rows))
    lines = [ln for ln in console.export_text().splitlines() if "req/s" in ln and "x" in ln]
    assert len(lines) == 2 * len(SWEEP_COMPARED)
    assert all(("8 req/s" in ln) == ("1.250x" in ln) for ln in lines)


def test_sweep_stops_at_over_saturation(both, tmp_path):
    """40 req/s against a server that runs one request at a time: the requests in flight
    grow without bound, the rate is stopped early with what is in flight cancelled, and
    the higher rate is never tried."""
    out = tmp_path / "sweep.json"
    proc = run_cli("bench", "serve", "sweep", "--base-url", both[1], "--api-key", API_KEY, "--num-prompts", "100",
                   "--input-len", "12", "--output-len", "8", "--request-rates", "40,80", "--saturation-after", "1.5",
                   "--output-json", str(out), "--plot", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [r["point"] for r in report["rows"]] == ["40 req/s"]
    row = report["rows"][0]
    assert row["stopped_early"].startswith("over-saturated") and row["cancelled"] > 0
    assert len(report["requests"]) < 100  # sending stopped too
    assert "over-saturated" in proc.stdout
    _assert_png(tmp_path / "plots" / "sweep.png")


TINY_RECIPE = """name: tiny
model:
  dtype: float32
  max_model_len: 256
  arch: {architectures: [LlamaForCausalLM], vocab_size: 50000, hidden_size: 128, intermediate_size: 256,
         num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 32,
         max_position_embeddings: 256, rms_norm_eps: 1.0e-5, rope_theta: 10000.0, tie_word_embeddings: false,
         torch_dtype: float32}
"""


def test_serve_dummy_gptq_weights_of_a_recipe(tiny_gptq):
    """`llmctl serve RECIPE --load-format dummy --quantization gptq`: random 4-bit weights of
    shapes with no files, a vocabulary larger than the stand-in tokenizer's; prompts keep
    their exact lengths and every sampled token streams as text (one chunk each)."""
    proc, url, log = tiny_gptq
    wait_up(proc, url, log)
    report = benchmark(_cfg(url, num_prompts=3, input_len=30, output_len=6))
    assert "placeholder tokens up to the vocabulary of 50,000" in " ".join(log.read_text().split())
    assert report["completed"] == 3, report["errors"]
    assert all(r["prompt_len"] == r["expected_prompt_len"] == 30 for r in report["requests"])
    assert all(r["output_len"] == 6 and len(r["itl"]) == 5 for r in report["requests"])


def test_slo_search_bisects_below_the_capacity(server, tmp_path):
    """With limits every request meets, each probe passes: after the capacity run, two
    bisection steps end at 3/4 of the measured capacity, printed as the best rate."""
    out = tmp_path / "search.json"
    proc = run_cli("bench", "serve", "sweep", "--base-url", server, "--api-key", API_KEY, "--num-prompts", "4",
                   "--input-len", "8", "--output-len", "2", "--slo", "ttft:600000", "--slo", "tpot:600000",
                   "--search-steps", "2", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    capacity, *probes = report["rows"]
    assert capacity["point"] == "capacity" and len(probes) == 2
    c = capacity["request_throughput"]
    assert [p["request_rate"] for p in probes] == pytest.approx([c / 2, 3 * c / 4])
    assert report["best"][server]["request_rate"] == pytest.approx(3 * c / 4)
    assert "highest rate meeting" in proc.stdout
