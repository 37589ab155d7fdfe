#!/usr/bin/env bash
# Stop the vLLM server that deploy/vllm/serve.sh started: SIGTERM to its process group, SIGKILL after a grace period.
#   deploy/vllm/stop.sh [--run-dir RUN] [--grace S]
# Safe to run when nothing is running. Only the group recorded in RUN/vllm.pid is signalled.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
run_dir="${VLLM_RUN_DIR:-$root/run/vllm}"
grace=20
while [[ $# -gt 0 ]]; do
    case "$1" in
        --run-dir) run_dir="$2"; shift 2 ;;
        --grace) grace="$2"; shift 2 ;;
        *) echo "stop.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
pid_file="$run_dir/vllm.pid"
[[ -f "$pid_file" ]] || { echo "stop.sh: no server recorded in $run_dir" >&2; exit 0; }
pid="$(cat "$pid_file")"

alive() { kill -0 -- "-$pid" 2>/dev/null; }   # any process left in the group
if alive; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq $(( grace * 5 ))); do alive || break; sleep 0.2; done
    if alive; then
        echo "stop.sh: group $pid still alive after ${grace}s, sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
        sleep 0.5
    fi
fi
rm -f "$pid_file" "$run_dir/vllm.url"
echo "stop.sh: stopped $pid" >&2
