#!/usr/bin/env bash
# The curriculum on two GPUs of one machine (nvidia-h200-x2), with the exp4 configs as shipped on the 8B-shaped
# random Qwen3-VL (see bench/gpu_env.sh for the settings every stage shares).
#   ddp:  stage 1 with configs/accelerate/ddp.yaml; stage 2 stopped by SIGTERM to the whole process group at step 4,
#         then the same command resumes it to the end; the verifier on both stages.
#   fsdp: stage 1 -> 2 with configs/accelerate/fsdp_qlora.yaml (batch_size 32: auto is refused under FSDP); the
#         verifier (the adapter file must hold every trained LoRA tensor, not a shard).
# Run bench/gpu_smoke.sh first in the same call: its one-GPU stage 1 is what the scaling efficiency compares with
# (bench/gpu_summary.py). A stage already finished in /tmp/exp4 by an earlier call on the same machine is kept.
#   [STEPS=10] [DEADLINE=epoch-seconds] bash bench/gpu_two_gpus.sh OUT_DIR ddp|fsdp ...
set -uo pipefail
out=${1:?output dir}; shift
source bench/gpu_env.sh || exit 1
failed=()

launch() {  # ACCELERATE_CONFIG STAGE_ARGS... : accelerate launch on both GPUs, as a user would
  local config=$1; shift
  python3 -m accelerate.commands.launch --config_file "configs/accelerate/$config.yaml" --num_processes 2 \
    train_qlora_qwen3vl.py "$@"
}

stage() {  # RUN CONFIG S [--set ...]
  local run=$1 config=$2 s=$3; shift 3
  [ -f "/tmp/exp4/$run/stage$s/stage_metrics.json" ] && { echo "== $run stage $s: kept from an earlier call"; return; }
  time_for 150 "$run stage $s" || { failed+=("$run stage $s (no time)"); return; }
  mkdir -p "$out/$run"
  mapfile -t args < <(exp4_stage_args "$s" "$run" "$@")
  launch "$config" "${args[@]}" > "$out/$run/stage$s.log" 2>&1
  report_stage $? "$out/$run/stage$s.log" "$run" "$s" || failed+=("$run stage $s")
}

stage_stopped_and_resumed() {  # RUN CONFIG S: SIGTERM to the process group after step 4, then the same command
  local run=$1 config=$2 s=$3
  [ -f "/tmp/exp4/$run/stage$s/stage_metrics.json" ] && { echo "== $run stage $s: kept from an earlier call"; return; }
  time_for 240 "$run stage $s stopped and resumed" || { failed+=("$run stage $s (no time)"); return; }
  mapfile -t args < <(exp4_stage_args "$s" "$run")
  local log="$out/$run/stage${s}_stopped.log"
  # the launcher itself leads the new process group (a shell in between would exit at SIGTERM before it)
  setsid python3 -m accelerate.commands.launch --config_file "configs/accelerate/$config.yaml" --num_processes 2 \
    train_qlora_qwen3vl.py "${args[@]}" > "$log" 2>&1 &
  local leader=$!
  touch "$log"
  for _ in $(seq 600); do tr '\r' '\n' < "$log" | grep -q "^step 4/" && break; kill -0 $leader 2>/dev/null || break; sleep 0.5; done
  kill -TERM -- -"$leader"
  wait $leader; local code=$?
  echo "== $run stage $s: SIGTERM to the process group after step 4: exit $code"
  tr '\r' '\n' < "$log" | grep -aE "Received|Stopped|checkpoint|error" | tail -6
  ls -d "/tmp/exp4/$run/stage$s.partial"/checkpoint-* || failed+=("$run stage $s: no checkpoint after SIGTERM")
  stage "$run" "$config" "$s"
  grep -a "^Resuming stage" "$out/$run/stage$s.log" || failed+=("$run stage $s did not resume")
}

verify() {  # RUN
  time_for 60 "$1 verifier" || { failed+=("$1 verifier (no time)"); return; }
  python3 verify_exp4_fix.py --curriculum "/tmp/exp4/$1" > "$out/$1/verify.txt" 2>&1 || failed+=("$1 verifier")
  grep -aE "^(==|✓|✗|-|verify)" "$out/$1/verify.txt"
}

[ -f /tmp/q8b/config.json ] || yardstick "$out"
for mode in "$@"; do
  mkdir -p "$out/$mode"
  case $mode in
    ddp) stage ddp ddp 1; stage_stopped_and_resumed ddp ddp 2; verify ddp ;;
    fsdp) stage fsdp fsdp_qlora 1 --set batch_size=32; stage fsdp fsdp_qlora 2 --set batch_size=32; verify fsdp
          [ -f /tmp/exp4/fsdp/stage1/stage_metrics.json ] || { time_for 90 "fsdp stage 1 again, CUDA_LAUNCH_BLOCKING" &&
            CUDA_LAUNCH_BLOCKING=1 stage fsdp-blocking fsdp_qlora 1 --set batch_size=32 --set max_steps=2; } ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_two_gpus: FAILED: ${failed[*]}"; exit 1
fi
echo "gpu_two_gpus: passed: $*"
