#!/usr/bin/env bash
# GPU acceptance run, unattended, in a few minutes on one H100/H200 (benchmarks/gpu_check.py says what is measured):
#   1. prepare: an MPNet-base-shaped student, a small Qwen2 teacher, data and a config (random init, no download)
#   2. bench:   a Qwen2-7B-shaped teacher's tokens/s and MFU; the student step per phase (ms, MFU, peak memory)
#   3. e2e:     torchrun train_ddp.py, both phases, a few steps each, NCCL, 2 ranks where 2+ GPUs exist (else 1)
#   4. record:  the run's status and wall time, and whether its final model loads, into the same JSON
# Usage:  bash scripts/gpu_check.sh            (results: runs/gpu_check.json, the run's log: runs/gpu_check.e2e.log)
# Environment: PYTHON (default: python3, else .venv/bin/python; the first whose torch sees CUDA; use the system
# python with a CUDA torch, not scripts/setup_env.sh, which installs a CPU torch), OUT_JSON, GPU_CHECK_KEEP=1 (keep
# the work folder), GPU_CHECK_TIMEOUT_{PREPARE,BENCH,E2E,RECORD} (seconds; defaults 120, 240, 180, 60).
# Without a CUDA device it prints one line and exits 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"  # not advertised: a dry run of every step on the CPU at toy shapes
if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); else candidates=(python3 "$ROOT/.venv/bin/python"); fi
PY=""
for c in "${candidates[@]}"; do
  command -v "$c" >/dev/null 2>&1 || continue
  if [ "$ALLOW_CPU" = 1 ]; then probe='import torch'; else
    probe='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; fi
  if "$c" -c "$probe" >/dev/null 2>&1; then PY="$c"; break; fi
done
if [ -z "$PY" ]; then
  hint=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [ "${n:-0}" -gt 0 ] && hint=" (nvidia-smi lists $n GPU(s): set PYTHON to a python whose torch has CUDA)"
  fi
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing to measure$hint"
  exit 0
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error

missing="$("$PY" - <<'EOF'
import importlib
names = ["transformers", "sentence_transformers", "datasets", "safetensors", "tokenizers", "yaml", "numpy",
         "torch.distributed.run", "distill.cli"]
bad = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # a broken install counts as missing
        bad.append(f"{name} ({type(e).__name__})")
print(", ".join(bad))
EOF
)" || missing="(the import check itself failed)"
if [ -n "$missing" ]; then
  echo "gpu_check: $PY cannot import: $missing (pip install -r the project's dependencies, keeping the CUDA torch)"
  exit 1
fi

OUT_JSON="${OUT_JSON:-runs/gpu_check.json}"
mkdir -p "$(dirname "$OUT_JSON")"
OUT_JSON="$(cd "$(dirname "$OUT_JSON")" && pwd)/$(basename "$OUT_JSON")"
E2E_LOG="${OUT_JSON%.json}.e2e.log"
rm -f "$OUT_JSON" "$E2E_LOG"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "gpu_check: work folder $WORK (kept)"; else trap 'rm -rf "$WORK"' EXIT; fi

extra=()
NPROC=1
if [ "$ALLOW_CPU" = 1 ]; then
  extra=(--allow-cpu --tiny)
  NPROC=2
else
  ngpu="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 1)"
  [ "${ngpu:-1}" -ge 2 ] && NPROC=2
fi

# run LIMIT_SECONDS CMD...: CMD under a hard time limit (SIGTERM, SIGKILL 15 s later); sets RC.
run() {
  local limit="$1"
  shift
  RC=0
  if command -v timeout >/dev/null 2>&1; then timeout -k 15 "$limit" "$@" || RC=$?; else "$@" || RC=$?; fi
  [ "$RC" = 124 ] && echo "gpu_check: timed out after ${limit}s: $*" >&2
  return 0
}

status=0
echo "gpu_check: python $PY, results -> $OUT_JSON"
run "${GPU_CHECK_TIMEOUT_PREPARE:-120}" "$PY" benchmarks/gpu_check.py --stage prepare --work "$WORK" \
  --out "$OUT_JSON" ${extra[@]+"${extra[@]}"}
prepared=$RC
[ "$prepared" = 0 ] || { echo "gpu_check: prepare failed (rc $prepared)" >&2; status=1; }

run "${GPU_CHECK_TIMEOUT_BENCH:-240}" "$PY" benchmarks/gpu_check.py --stage bench --work "$WORK" \
  --out "$OUT_JSON" ${extra[@]+"${extra[@]}"}
[ "$RC" = 0 ] || { echo "gpu_check: bench failed (rc $RC); see \"errors\" in $OUT_JSON" >&2; status=1; }

if [ "$prepared" = 0 ]; then
  echo "gpu_check: end-to-end run, $NPROC rank(s), log -> $E2E_LOG"
  t0="$(date +%s.%N)"
  run "${GPU_CHECK_TIMEOUT_E2E:-180}" "$PY" -m torch.distributed.run --standalone --nnodes=1 \
    --nproc_per_node="$NPROC" train_ddp.py --config "$WORK/e2e.yaml" >"$E2E_LOG" 2>&1
  e2e_rc=$RC
  wall="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  [ "$e2e_rc" = 0 ] || { echo "gpu_check: end-to-end run failed (rc $e2e_rc); log tail:" >&2; tail -n 25 "$E2E_LOG" >&2; }
  run "${GPU_CHECK_TIMEOUT_RECORD:-60}" "$PY" benchmarks/gpu_check.py --stage record --work "$WORK" \
    --out "$OUT_JSON" --e2e-rc "$e2e_rc" --e2e-wall "$wall" --e2e-nproc "$NPROC" --e2e-log "$E2E_LOG" \
    ${extra[@]+"${extra[@]}"}
  [ "$RC" = 0 ] || status=1
else
  status=1
fi

if [ "$status" = 0 ]; then echo "gpu_check: all steps passed; results in $OUT_JSON"
else echo "gpu_check: FAILED (see above); results so far in $OUT_JSON" >&2; fi
exit "$status"
