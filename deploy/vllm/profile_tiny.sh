#!/usr/bin/env bash
# Make deploy/vllm/tiny-cpu.profile.json: start the real vLLM (CPU, tiny model, 4 adapters of ranks 8/16,
# --max-loras 2), profile it with `adaptwin profile vllm --quick`, fit with `adaptwin twin fit`, stop the server.
#
#   deploy/vllm/profile_tiny.sh [--run-dir DIR] [--out deploy/vllm/tiny-cpu.profile.json]
#
# The calibration CSVs go to deploy/vllm/tiny-cpu-calibration/. ITL and TTFT come from vLLM's own histograms
# (--itl-from server; TTFT of one-request shots from vllm:time_to_first_token_seconds): on a shared 2-core machine the
# API process delivers tokens in bursts, which client timestamps cannot tell from fast steps. docs/vllm-cpu.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run_dir="${VLLM_RUN_DIR:-$root/run/vllm-profile}"
out="$here/tiny-cpu.profile.json"
cal="$here/tiny-cpu-calibration"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --run-dir) run_dir="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "profile_tiny.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
adaptwin="$root/.venv/bin/adaptwin"

url="$("$here/serve.sh" --run-dir "$run_dir" --adapters 4 --ranks 8,16 --max-loras 2 --timeout 400 | tail -n 1)"
trap '"$here/stop.sh" --run-dir "$run_dir" >/dev/null 2>&1 || true' EXIT
rm -rf "$cal"
# no scheduler experiment: its term is below this CPU server's step jitter (docs/profiler.md)
"$adaptwin" profile vllm --url "$url" --out "$cal" --quick --model tiny --itl-from server \
    --experiments decode,lora,prefill,loading,kv --decode-batches 1,4,8,16,24 --lora-batches 8 --prefill-tokens 16,256,512,1000 --repeats 5 --batch-repeats 3
"$adaptwin" twin fit --calibration "$cal" --model tiny --gpu cpu-2vcpu --out "$out"
