#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on one H200 (docs/scaling.md, "The GPU check").
#
#   benchmarks/gpu_check.sh [OUTDIR]      # OUTDIR default: $OUT, else ./gpu_check_out
#
# Run from anywhere; it works in the repository that holds it. Steps, each under its own
# time limit (seconds, in brackets), exit code and wall time recorded:
#   0. CUDA present? If not: prints "gpu_check: no CUDA device ...", writes a summary with
#      status "no_cuda" and exits 3 (nothing installed, nothing run).
#   1. install [30]: the wheels in .whl/ (if any) and this checkout, into a private folder
#      on PYTHONPATH (pip --no-index --no-deps --target; no network, nothing else touched).
#      The checkout is copied as the installed package would lay it out (src/tre_lightning,
#      with conf/ and callbacks/ inside), so no build backend is needed.
#   2. tests [120]: pytest -m gpu on the test files that carry the mark.
#   3. kernels [90]: benchmarks/regularizers.py --device cuda --dtype bfloat16 (N = 2,048, V = 151,936).
#   4. ppo [130]: one bf16 PPO iteration (after one warm-up) of a Qwen2.5-0.5B-shaped random model
#      (benchmarks/gpu_check.py ppo): tokens/s and peak memory.
#   5. fsdp [100]: the same under ModelParallelStrategy with one device (FSDP2, bf16 mixed precision).
# Then OUTDIR/summary.json, OUTDIR/summary.md and OUTDIR/gpu_check.log (every step's output).
# Exit 0 when every step passed, 1 otherwise, 3 without CUDA.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUTDIR="${1:-${OUT:-gpu_check_out}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d)"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1; then
  msg="gpu_check: no CUDA device (torch.cuda.is_available() is False in $PY): nothing was installed or run; run it on a machine with a CUDA GPU"
  echo "$msg" | tee -a "$LOG" >&2
  "$PY" benchmarks/gpu_check.py summary --work "$WORK" --out "$OUTDIR" --message "$msg"
  rm -rf "$WORK"
  exit 3
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output, record exit code and wall time
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
  echo "=== $name: exit $rc" | tee -a "$LOG"
  return 0
}

install() {
  local site="$WORK/site"
  mkdir -p "$site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || return 1
  fi
  cp -r src/tre_lightning "$site/" && cp -r conf "$site/tre_lightning/conf" && cp -r callbacks "$site/tre_lightning/callbacks" || return 1
  "$PY" -c "import tre_lightning, hydra, omegaconf, jsonargparse; print('tre_lightning from', tre_lightning.__file__)"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu_info.txt" 2>/dev/null
"$PY" -c "import torch, lightning, transformers, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())" >>"$WORK/gpu_info.txt" 2>&1

export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" WORK PY
export -f install
step install 30 bash -c install
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/*.py tests/*/*.py 2>/dev/null)
step tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rA "${GPU_TESTS[@]}"
grep -E "(PASSED|FAILED|SKIPPED|ERROR|passed|failed|skipped|error)" "$LOG" | tail -n 20 >"$WORK/tests_tail.txt"
step kernels 90 "$PY" benchmarks/regularizers.py --device cuda --dtype bfloat16 --positions 2048 --vocab 151936 \
  --json "$WORK/regularizers.json"
step ppo 130 "$PY" benchmarks/gpu_check.py ppo --json "$WORK/ppo.json"
step fsdp 100 "$PY" benchmarks/gpu_check.py fsdp --json "$WORK/fsdp.json"

"$PY" benchmarks/gpu_check.py summary --work "$WORK" --out "$OUTDIR"
status=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['status'])" "$OUTDIR/summary.json")
echo "gpu_check: $status; summary in $OUTDIR/summary.md"
rm -rf "$WORK"
[ "$status" = ok ]
