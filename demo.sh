#!/usr/bin/env bash
# The demo curriculum on the tiny random Qwen3-VL: three stages, each continuing the same LoRA adapter, each
# verified, then the whole curriculum. A CPU is enough: about 2.5 minutes on 2 cores. Outputs go to
# models/demo_curriculum/ (re-run: replaced).
#   bash demo.sh                      # extra arguments go to every stage, e.g.  bash demo.sh --set max_steps=10
set -euo pipefail
cd "$(dirname "$0")"
for stage in 1 2 3; do
  echo "=== stage $stage: python train_qlora_qwen3vl.py configs/demo/stage$stage.yaml $*"
  python train_qlora_qwen3vl.py "configs/demo/stage$stage.yaml" --set overwrite=true "$@"
  echo "=== verify stage $stage"
  python verify_exp4_fix.py "models/demo_curriculum/stage$stage"
done
echo "=== the whole curriculum"
python verify_exp4_fix.py --curriculum models/demo_curriculum --skip-load
