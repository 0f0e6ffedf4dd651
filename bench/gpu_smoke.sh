#!/usr/bin/env bash
# The README's install on one GPU, as a new user runs it: stage 1 -> 2 of the exp4 configs as shipped (the defaults:
# batch_size: auto, liger_kernels: auto, ...) on the 8B-shaped random Qwen3-VL, then the verifier, beside the
# yardstick (the textbook HF QLoRA loop) in the same call. Exit 1, naming what failed, unless both stages trained
# with the Liger kernels on and the verifier passed every check. Run it after any change to a speed path.
#   here:            bash bench/gpu_wheels.sh          (then carry .whl and .gpu)
#   on the GPU:      [STEPS=10] [DEADLINE=epoch-seconds] [NO_YARDSTICK=1] bash bench/gpu_smoke.sh OUT_DIR
set -uo pipefail
out=${1:?output dir}
mkdir -p "$out"
source bench/gpu_env.sh || exit 1
failed=()
# NO_YARDSTICK=1: the same call ran it already (bench/gpu_speed.sh), and left the 8B checkpoint at /tmp/q8b
[ -n "${NO_YARDSTICK:-}" ] || yardstick "$out" || failed+=(yardstick)
for s in 1 2; do
  time_for 150 "smoke stage $s" || { failed+=("stage $s (no time)"); break; }
  mapfile -t args < <(exp4_stage_args "$s" smoke)
  python3 train_qlora_qwen3vl.py "${args[@]}" > "$out/stage$s.log" 2>&1
  report_stage $? "$out/stage$s.log" smoke "$s" || failed+=("stage $s")
done
if time_for 60 "smoke verifier"; then
  python3 verify_exp4_fix.py --curriculum /tmp/exp4/smoke > "$out/verify.txt" 2>&1 || failed+=(verifier)
  grep -aE "^(==|✓|✗|-|verify)" "$out/verify.txt"
else
  failed+=("verifier (no time)")
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_smoke: FAILED: ${failed[*]}"; exit 1
fi
echo "gpu_smoke: passed (stage 1 -> 2 with the shipped defaults, Liger on, verifier without a failure)"
