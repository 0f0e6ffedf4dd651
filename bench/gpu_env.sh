# Sourced by the GPU bench scripts, on the GPU machine, from the repo root: the README's install over the machine's
# own torch (the pinned wheels that bench/gpu_wheels.sh put in .whl/, bitsandbytes in .gpu/bnb), NVLink multicast
# off for NCCL and everything it starts, and a check that the versions in use are requirements.txt's.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -d /tmp/site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/.gpu/bnb:${PYTHONPATH:-}
python3 - <<'PY' || { echo "gpu_env: the versions in use are not requirements.txt's" >&2; exit 1; }
import importlib.metadata as md, re, sys, torch
pins = dict(re.findall(r"^([\w-]+)==(\S+)", open("requirements.txt").read(), re.M))
used = {name: md.version(name) for name in ("transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")}
print("versions:", ", ".join(f"{k} {v}" for k, v in used.items()), f"| torch {torch.__version__} (the machine's)",
      f"| {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
sys.exit(any(pins[k] != v for k, v in used.items()))
PY

# The 8B-shaped random Qwen3-VL at /tmp/q8b: the yardstick writes it on first use (and measures itself, into
# $1/yardstick.json); the processor comes from .gpu/q8b_processor.
yardstick() {
  python3 .gpu/hf_baseline_qlora.py --image 448 --batch 4 --steps 10 --json "$1/yardstick.json" 2>&1 | grep -v Warning
  cp .gpu/q8b_processor/* /tmp/q8b/
}

# Seconds left before DEADLINE (epoch seconds; unset: plenty): a step that needs more is skipped, and says so,
# so that a device call ends with its results written instead of being cut off.
time_for() {
  local need=$1 what=$2
  if [ -n "${DEADLINE:-}" ] && [ $(( DEADLINE - $(date +%s) )) -lt "$need" ]; then
    echo "SKIPPED (no time left in this call): $what"; return 1
  fi
}

# The arguments of exp4 stage S as shipped (batch_size: auto, liger_kernels: auto, every default), on the random 8B
# with every image 448x448, STEPS steps, no intermediate evaluation or checkpoints, on the sample split repeated 10
# times (so batch_size: auto is not capped by 200 records), into /tmp/exp4/RUN/stageS.
#   exp4_stage_args S RUN [--set key=value ...]
exp4_stage_args() {
  local s=$1 run=$2; shift 2
  local train; train=$(python3 bench/repeat_split.py "data/stage$s/train.jsonl" 10)
  local args=("configs/exp4_stage$s.yaml" --set model_name_or_path=/tmp/q8b --set "max_steps=${STEPS:-10}"
              --set min_pixels=200704 --set max_pixels=200704 --set eval_steps=0 --set save_steps=0
              --set logging_steps=2 --set "train_file=$train" --set "output_dir=/tmp/exp4/$run/stage$s")
  [ "$s" -gt 1 ] && args+=(--set "prev_checkpoint=/tmp/exp4/$run/stage$((s - 1))")
  printf '%s\n' "${args[@]}" "$@"
}

# progress bars end their lines with \r: the log lines after one start a line only once \r is a line end
# After a stage: its exit code, the lines worth reading, its metrics beside its log; 1 if it did not finish with
# the Liger kernels on (what the README's install must give on a GPU).
report_stage() {  # EXIT_CODE LOG RUN S
  local code=$1 log=$2 run=$3 s=$4
  echo "== $run stage $s: exit $code"
  tr '\r' '\n' < "$log" | grep -aE "^(step|Speed patch|Batch size|Effective|first_eval_loss|final_eval_loss|Saved|error|Stopped|Resuming)|✓|All [0-9]+ processes|Loaded 4-bit" | tail -30
  cp "/tmp/exp4/$run/stage$s/stage_metrics.json" "${log%.log}_metrics.json" 2>/dev/null || true
  [ "$code" -eq 0 ] || return 1
  grep -q "Speed patch Liger kernels (RoPE, RMSNorm, SwiGLU): on" "$log"
}
