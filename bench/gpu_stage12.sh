#!/usr/bin/env bash
# Stage 1 and stage 2 of the curriculum on an 8B-shaped Qwen3-VL (random weights) on one GPU, next to the
# yardstick (../shared/bench/hf_baseline_qlora.py, the textbook HF QLoRA loop) in the same run.
# Run on the GPU machine from the repo root, with .gpu/ (bash ../shared/tools/gpu_bnb.sh; and
# python tiny_qwen3vl.py .gpu/q8b_processor --shape 8b --processor-only) and .whl/ carried along.
#   [STAGE_ARGS="--set key=value ..."] [STAGE_REPEAT=N] bash bench/gpu_stage12.sh OUT_DIR [STEPS]
# STAGE_REPEAT=N trains on each stage's sample split repeated N times (ids made unique), so that batch_size: auto
# is not capped by the 200-record samples (it keeps 10 optimizer steps per epoch).
set -uo pipefail
out=${1:?output dir}; steps=${2:-30}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.gpu/bnb:${PYTHONPATH:-}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__, 'accelerate', accelerate.__version__)"

# The yardstick: writes the random 8B checkpoint to /tmp/q8b, then the textbook loop at batch 4 on W448.
python3 .gpu/hf_baseline_qlora.py --image 448 --batch 4 --steps 10 --json "$out/baseline.json" 2>&1 | grep -v Warning
cp .gpu/q8b_processor/* /tmp/q8b/

# The project's trainer: the exp4 configs as shipped, but on the random 8B, every image 448x448 (196 tokens),
# a fixed number of steps, no intermediate evaluation or checkpoints.
common=(--set model_name_or_path=/tmp/q8b --set max_steps=$steps --set grad_accum=1 --set min_pixels=200704
        --set max_pixels=200704 --set eval_steps=0 --set save_steps=0 --set logging_steps=5
        --set tensorboard=false ${STAGE_ARGS:-})  # no tensorboard package there; STAGE_ARGS: more --set
for s in 1 2; do
  extra=(); [ $s -gt 1 ] && extra=(--set prev_checkpoint=/tmp/exp4/stage$((s - 1)))
  if [ "${STAGE_REPEAT:-1}" -gt 1 ]; then
    python3 - data/stage$s/train.jsonl "$STAGE_REPEAT" <<'PY'
import json, sys
src, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(src)]
with open(src.replace(".jsonl", f"_x{n}.jsonl"), "w") as f:
    for i in range(n):
        for r in rows:
            f.write(json.dumps({**r, "id": f"{r['id']}_{i}"}) + "\n")
PY
    extra+=(--set train_file=data/stage$s/train_x$STAGE_REPEAT.jsonl)
  fi
  python3 train_qlora_qwen3vl.py configs/exp4_stage$s.yaml "${common[@]}" "${extra[@]}" \
    --set output_dir=/tmp/exp4/stage$s > "$out/stage$s.log" 2>&1
  echo "stage $s exit $?"
  grep -vE "it/s\]|Warning|warn" "$out/stage$s.log" | grep -E "^step|eval_loss|Trainable|trainable|CURRICULUM|✓|Saved|Loaded 4-bit|Batch size|Effective|Decoding|rror" | tail -25
  cp /tmp/exp4/stage$s/stage_metrics.json "$out/stage${s}_metrics.json" 2>/dev/null
done
# The verifier on the 8B stages: every check, the 4-bit reload with is_trainable=True included.
python3 verify_exp4_fix.py --curriculum /tmp/exp4 2>&1 | grep -E "^(==|✓|✗|-|verify)" | tee "$out/verify.txt"

python3 - "$out" <<'PY'
import json, re, statistics, sys
out = sys.argv[1]
base = json.load(open(f"{out}/baseline.json"))[0]
print(f"yardstick W448 bs4: {base['samples_per_s']} samples/s, {base['step_s']} s/step, {base['peak_GiB']} GiB")
for s in (1, 2):
    try:
        m = json.load(open(f"{out}/stage{s}_metrics.json"))
    except OSError:
        print(f"stage {s}: no metrics"); continue
    sps = m["samples_per_second"]
    # steady state: the logged intervals after the first (which holds warm-up and dataloader start)
    dts = [float(x) for x in re.findall(r"dt ([0-9.]+)s/step", open(f"{out}/stage{s}.log").read())][1:]
    steady = statistics.median(dts) if dts else float("nan")
    bs = m["effective_batch_size"]
    print(f"stage {s}: whole run {sps} samples/s ({sps / base['samples_per_s']:.2f}x yardstick); steady "
          f"{steady:.3f} s/step = {bs / steady:.2f} samples/s ({bs / steady / base['samples_per_s']:.2f}x); "
          f"peak {m['peak_gpu_memory_gib']} GiB, "
          f"trainable {m['trainable_params']:,}, first_eval {m['first_eval_loss']:.4f}, "
          f"prev final {m['previous_final_eval_loss']}, final {m['final_eval_loss']:.4f}")
PY
