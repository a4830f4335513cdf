#!/usr/bin/env bash
# Many calibration runs at once on one GPU: one `calibration.py --only` process per line of a job list,
# PARALLEL at a time, in the list's order (put what matters first), all stopped at one deadline. A run
# killed by the deadline leaves nothing; every finished run is a complete record under OUTPUT, which
# `calibration.py --summary-only --output OUTPUT` reads like a CPU run's.
#
#   benchmarks/gpu_grid.sh JOBS OUTPUT [PARALLEL=5] [DEADLINE_S=480] [DEVICE=cuda]
#
# PARALLEL: on one H200 (2026-12-04), 5 processes finished a QA run each in 140-170 s wall; 16 processes
# slowed each run about 3x (the processes time-share the one GPU), so a wave of 16 finished fewer runs.
#
# A line of JOBS: TASK METHOD:SEED [TAG [KEY=VALUE ...]] (TAG "-" for none; KEY=VALUE go to --set);
# "#" starts a comment. Example:
#   openbookqa normal:0
#   openbookqa flow:0 top6 trainable_layers=6
# Each process holds its own model and activation cache (--activation-cache none: no file is shared
# between processes) and fits no post-hoc peers (laplace-torch need not be installed). One log per run
# under OUTPUT/logs; GRID_SET="KEY=VALUE ..." is added to every run's --set (a tiny smoke config). Python: $PYTHON, else the repo's .venv, else python3.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
jobs_file="${1:?usage: gpu_grid.sh JOBS OUTPUT [PARALLEL] [DEADLINE_S] [DEVICE]}"
output="${2:?usage: gpu_grid.sh JOBS OUTPUT [PARALLEL] [DEADLINE_S] [DEVICE]}"
parallel="${3:-5}"
deadline_s="${4:-480}"
device="${5:-cuda}"
[[ -r "$jobs_file" ]] || { echo "gpu_grid.sh: job list $jobs_file cannot be read" >&2; exit 2; }
[[ "$parallel" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_grid.sh: PARALLEL must be a positive integer, got $parallel" >&2; exit 2; }
[[ "$deadline_s" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_grid.sh: DEADLINE_S must be a positive integer, got $deadline_s" >&2; exit 2; }
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$output/logs"
output="$(cd "$output" && pwd)"
export PYTHON output device here HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
export GRID_DEADLINE=$(( $(date +%s) + deadline_s ))

one_run() {  # TASK METHOD:SEED [TAG [KEY=VALUE ...]]
  local task="$1" run="$2" tag="${3:--}"
  shift 2; [[ $# -gt 0 ]] && shift
  local method="${run%%:*}" seed="${run##*:}" left=$(( GRID_DEADLINE - $(date +%s) ))
  local name="${task}_${method}_${seed}"; [[ "$tag" != "-" ]] && name="${task}_${method}-${tag}_${seed}"
  if (( left <= 0 )); then echo "$(date +%T) $name not started: deadline"; return 0; fi
  local sets=("$@") extra=() more=()
  [[ -n "${GRID_SET:-}" ]] && read -r -a more <<<"$GRID_SET" && sets+=("${more[@]}")
  [[ "$tag" != "-" ]] && extra+=(--tag "$tag"); [[ ${#sets[@]} -gt 0 ]] && extra+=(--set "${sets[@]}")
  echo "$(date +%T) $name started"
  (cd "$here" && timeout "$left" "$PYTHON" calibration.py --tasks "$task" --methods "$method" --seeds "$seed" \
      --only "$run" --device "$device" --output "$output" --activation-cache none --no-report --peers \
      "${extra[@]}") >"$output/logs/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name rc=$rc $(grep -a "seed $seed: " "$output/logs/$name.log" | tail -1)"
}
export -f one_run

grep -v '^\s*\(#\|$\)' "$jobs_file" | xargs -P "$parallel" -L 1 bash -c 'one_run "$@"' _
