#!/usr/bin/env bash
# Speed and memory on one GPU: the yardstick (../shared/bench/hf_baseline_qlora.py, carried as .gpu/) and the
# project's training path (bench/speed.py) in the same run, then the table (bench/report.py).
# Run on the GPU machine from the repo root, with .gpu/ (bash ../shared/tools/gpu_bnb.sh; and
# python tiny_qwen3vl.py .gpu/q8b_processor --shape 8b --processor-only) and .whl/ carried along.
#   bash bench/gpu_speed.sh OUT_DIR [VARIANT ...]
set -uo pipefail
out=${1:?output dir}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.gpu/bnb:${PYTHONPATH:-} TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
# The yardstick writes the random 8B checkpoint to /tmp/q8b, then runs the textbook loop at batch 4.
python3 .gpu/hf_baseline_qlora.py --image 448 896 --batch 4 --steps 10 --json "$out/yardstick.json" 2>&1 | grep -v Warning
cp .gpu/q8b_processor/* /tmp/q8b/
python3 bench/speed.py --ckpt /tmp/q8b --out "$out" ${SPEED_ARGS:-} ${1:+--variants "$@"} 2>&1 \
  | grep -vE "it/s\]|s/it\]|Warning|warn|^\s*$" | tee "$out/speed.log" | grep -E '^\{|rror|Traceback|File "' 
python3 bench/report.py "$out" | tee "$out/table.md"
