#!/usr/bin/env bash
# The demo curriculum on the tiny random Qwen3-VL: three stages, each continuing the same LoRA adapter, each
# verified, then the whole curriculum. A CPU is enough. Outputs go to models/demo_curriculum/ (re-run: replaced).
#   bash demo.sh                  # the quick path: 10 optimizer steps a stage (about 3 minutes on 2 cores)
#   bash demo.sh --full           # the stage configs as written: 2 epochs a stage (about 9 minutes on 2 cores)
#   bash demo.sh --set lr=1e-3    # any other arguments go to every stage
set -euo pipefail
cd "$(dirname "$0")"
steps=(--set max_steps=10)
if [ "${1:-}" = "--full" ]; then
  steps=()
  shift
fi
for stage in 1 2 3; do
  echo "=== stage $stage: python train_qlora_qwen3vl.py configs/demo/stage$stage.yaml --set overwrite=true ${steps[*]} $*"
  python train_qlora_qwen3vl.py "configs/demo/stage$stage.yaml" --set overwrite=true "${steps[@]}" "$@"
  echo "=== verify stage $stage"
  python verify_exp4_fix.py "models/demo_curriculum/stage$stage"
done
echo "=== the whole curriculum"
python verify_exp4_fix.py --curriculum models/demo_curriculum --skip-load
