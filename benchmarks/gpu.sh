#!/usr/bin/env bash
# Short accelerator check: bf16-autocast step time and peak memory of pyro_blora's flow
# guide against peft LoRA on a random ~1.1B Llama-shaped model (benchmarks/gpu_check.py).
#
#   benchmarks/gpu.sh --output runs/bench/gpu.json     # on a GPU machine (a minute or two)
#   benchmarks/gpu.sh --tiny                           # anywhere, seconds (or PYRO_BLORA_BENCH_TINY=1)
#
# Python: $PYTHON, else the repo's .venv, else python3. Other arguments go to gpu_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

args=()
for arg in "$@"; do
  case "$arg" in
    --tiny) export PYRO_BLORA_BENCH_TINY=1 ;;
    *) args+=("$arg") ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" "$here/gpu_check.py" ${args[@]+"${args[@]}"}
