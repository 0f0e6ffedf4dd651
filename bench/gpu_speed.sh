#!/usr/bin/env bash
# Speed and memory on one GPU, three ways in one device call, on the same random 8B-shaped Qwen3-VL: the yardstick
# (../shared/bench/hf_baseline_qlora.py, the textbook HF QLoRA loop), Unsloth (the fastest peer,
# ../shared/bench/unsloth/) and the project's training path (bench/speed.py); then one table (bench/report.py).
#
# Prepare here, from the repo root:
#   bash bench/gpu_wheels.sh                                  # .whl (the README's pins) and .gpu (bitsandbytes, yardstick)
#   mkdir -p .unsloth && cp ../shared/bench/unsloth/* .unsloth/ && bash .unsloth/make_bundle.sh
# Device call (carry .whl .gpu .unsloth):
#   bash bench/gpu_speed.sh OUT [VARIANT ...]                 # variants: bench/speed.py's VARIANTS
#   IMAGES=448 bash bench/gpu_speed.sh OUT W448-...            # the yardstick and Unsloth at one image size only:
#                                                             # one call per size, each call's ratios its own
#   PIPELINE=1 ...                                            # also the input pipeline's own rate per variant
#
# The yardstick and the project run over the README's pinned pure-Python libraries (bench/gpu_env.sh); Unsloth
# 2026.10.9 accepts transformers <= 5.17, so it runs over the GPU machine's own stack, as its bench prescribes.
# Each part has a time limit and the whole ends within BUDGET seconds (default 540): what did not fit is marked
# skipped in the table instead of the call being cut off. The variants run in the order given, so put first what
# the table must have. At the end the profiles, Unsloth's metadata and the project's own log go into OUT/extra.tgz
# (OUT then holds 6 files: gpu_speed.log, yardstick.json, unsloth.json, speed.json, table.md, extra.tgz).
set -uo pipefail
out=$(mkdir -p "${1:?output dir}" && cd "$1" && pwd); shift
variants=("$@")
# the defaults (batch_size: auto, 20 GiB); the plan of an effective batch at Unsloth's memory (12 and 11.2 GiB budgets:
# 10.8 and 10.1 usable), on the whole card (auto) and at 20 GiB; the M-RoPE positions in the forward against the
# dataloader at one batch. Each takes about a minute (2026-12-02: 4 in 240 s, the plans and profiles included), so
# one call of 10 minutes holds about 5 beside the yardstick and Unsloth: the rest are marked skipped.
[ ${#variants[@]} -gt 0 ] || variants=(W448-defaults W448-plan64-budget12 W448-plan64-auto W896-plan16-budget11.2
                                       W896-plan16-auto W896-defaults W448-plan64-budget20 W448-defaults-bs64
                                       W448-positions-off-bs64 W896-plan16-budget20)
T0=$(date +%s)
BUDGET=${BUDGET:-540}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
exec > >(tee -a "$out/gpu_speed.log") 2>&1
source bench/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== yardstick ($(left) s left)"  # writes the random 8B checkpoint to /tmp/q8b on first use
timeout -k 10 "${YARDSTICK_S:-170}" python3 .gpu/hf_baseline_qlora.py --image ${IMAGES:-448 896} --batch 4 --steps 10 \
  --json "$out/yardstick.json" 2>&1 | grep -v Warning
cp .gpu/q8b_processor/* /tmp/q8b/ || { echo "FATAL: no checkpoint at /tmp/q8b"; exit 1; }

unsloth_s=${UNSLOTH_S:-215}  # its batch 64 at 448x448 did not fit 200 s on 2026-12-02 (156.7 s for three rows)
if [ -d .unsloth/whl ] && [ "$(left)" -gt $(( unsloth_s + 150 )) ]; then
  echo "== Unsloth ($(left) s left, ${unsloth_s} s for it)"
  [ -d /tmp/usite/unsloth ] || python3 -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target /tmp/usite .unsloth/whl/*.whl
  mkdir -p /tmp/unsloth_work
  # offline, no download counter, as .unsloth/run.sh runs it; the machine's transformers, not /tmp/site's
  ( cd /tmp/unsloth_work && env PYTHONPATH="/tmp/usite:$OLDPWD/.gpu/bnb" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
      HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 UNSLOTH_DISABLE_STATISTICS=1 \
      UNSLOTH_FORCE_SINGLE_COMPILE_WORKER=0 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_work/unsloth_compiled_cache \
      timeout -k 10 "$unsloth_s" python3 "$OLDPWD/.unsloth/unsloth_bench.py" --ckpt /tmp/q8b --image ${IMAGES:-448 896} \
      --batch ${UNSLOTH_BATCHES:-16 32 64} --skip ${UNSLOTH_SKIP:-896:32 896:64} --steps 8 --warmup 3 --deadline $(( unsloth_s - 45 )) \
      --json "$out/unsloth.json" 2>&1 | grep -E '^\{|rror|Traceback' | cut -c1-400 )
else
  echo "SKIPPED: Unsloth (no .unsloth/whl carried, or no time left)"
fi

echo "== the project: ${variants[*]} ($(left) s left)"
timeout -k 10 $(( $(left) - 15 )) python3 bench/speed.py --ckpt /tmp/q8b --out "$out" --variants "${variants[@]}" \
  --steps "${STEPS:-6}" --warmup 2 --generation 0 $([ -n "${PIPELINE:-}" ] || echo --no-pipeline) --deadline $(( $(left) - 75 )) \
  --profile ${PROFILE:-W448-defaults W448-plan64-budget12 W448-plan64-auto W448-defaults-bs64 W448-positions-off-bs64} \
  2>&1 | grep -vE "it/s\]|s/it\]|Warning|warn|^\s*$" > "$out/speed.log"
grep -E '^\{|rror|Traceback|File "|^Plan|^Batch size' "$out/speed.log" | cut -c1-700
python3 bench/report.py "$out" | tee "$out/table.md"
( cd "$out" && tar czf extra.tgz --remove-files speed.log unsloth_meta.json profile_* sync_sites_* 2>/dev/null )
echo "== done after $(( $(date +%s) - T0 )) s"
