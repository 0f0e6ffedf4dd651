"""Merge a stage's LoRA adapter into its base and write a model to serve: a standard Transformers folder (weights in
bfloat16, config, processor, chat template) that vLLM, SGLang or transformers load without peft.

    python export_merged.py models/exp4_curriculum/stage3 models/exp4_merged              # merge, check 20 questions
    python export_merged.py models/exp4_curriculum/stage3 models/exp4_merged --check 100
    python export_merged.py STAGE_DIR OUT_DIR --base /disks/Qwen3-VL-8B-Instruct --check 0   # a local base, no check

The base is loaded in bfloat16, never in 4 bit: merged into 4-bit weights, each W + BA would be rounded back to
4 bits, and the adapter's update, far smaller than one 4-bit step, would mostly be lost. A base stored quantized is
refused. The merge itself stays out of the trainer, whose continued stages must never merge (the verifier checks).

The check reloads the folder as a server would, and compares it, on N questions of the stage's dev split, with the
same bfloat16 base carrying the unmerged adapter: the greedy answers, and the logits along the adapter model's
answer. It passes when the answers are the same (or differ only where the adapter model's top two tokens are a
near tie, within the tolerance), the logits differ by at most LOGIT_TOLERANCE of the largest logit, and less than
the adapter itself moves them (else merging could not be told from not merging). The folder is written as
OUT_DIR.exporting and renamed to OUT_DIR once written and checked.

Exit 0: written (and checked); 1: the check failed (the model is left in OUT_DIR.exporting); 2: bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import train_qlora_qwen3vl as tq
import verify_exp4_fix as vf
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.answer_loss import answer_positions
from curriculum.base_model import from_pretrained_checked, load_processor, resolve_model_path
from curriculum.config import StageConfig, load_config
from curriculum.data_files import dataset_image_dir, load_records
from curriculum.errors import ConfigError
from curriculum.evaluation import generate_answers
from curriculum.hashing import sha256_file
from curriculum.processes import training_device
from curriculum.records import Record
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS

EXPORT_DTYPE = "bfloat16"
# bfloat16 keeps 8 significant bits, so one rounding step of a logit is 1/128 to 1/256 of it; merging rounds every
# merged weight once more, and the rounding is carried through the layers. 3% of the largest logit is ~4-8 steps.
# On the demo model merging moved the logits by 0.03-0.06 of ~10, while the adapter itself moves them by ~5.
LOGIT_TOLERANCE = 0.03
CHECK_FILE = "export_check.json"


def stage_config(stage_dir: Path) -> StageConfig:
    """The stage's own resolved config, with output_dir pointing at where the stage is now (it may have moved)."""
    adapter = vf.check_adapter_files(stage_dir) if stage_dir.is_dir() else None
    if adapter is None or adapter.status != vf.PASS:
        raise ConfigError(f"{stage_dir}: not a stage folder with a LoRA adapter"
                          + (f" ({adapter.detail})" if adapter else ""))
    if not (stage_dir / RESOLVED_CONFIG).is_file():
        raise ConfigError(f"{stage_dir}: no {RESOLVED_CONFIG}, so the base and the settings are unknown")
    return dataclasses.replace(load_config(stage_dir / RESOLVED_CONFIG), output_dir=str(stage_dir))


def refuse_quantized_base(model_path: str, cfg: StageConfig) -> None:
    """A base checkpoint stored quantized (bitsandbytes, GPTQ, AWQ, ...) cannot take a merge without losing it."""
    from transformers import AutoConfig

    quantization = getattr(from_pretrained_checked(AutoConfig, model_path, cfg), "quantization_config", None)
    if quantization:
        method = (quantization if isinstance(quantization, dict) else quantization.to_dict()).get("quant_method")
        raise ConfigError(
            f"the base {model_path} is stored quantized ({method}). Merging into it would round every merged weight "
            "W + BA back to the quantized grid, and the adapter's update, far smaller than one 4-bit step, would "
            "mostly be lost. Export from the unquantized (bf16) checkpoint it was made from: --base PATH_OR_ID")


def load_bf16(model_path: str, cfg: StageConfig):
    import torch
    from transformers import AutoModelForImageTextToText

    return from_pretrained_checked(AutoModelForImageTextToText, model_path, cfg, dtype=getattr(torch, EXPORT_DTYPE),
                                   device_map={"": training_device()})


def answer_logits(model, processor, records: list[Record], answers: list[str], cfg: StageConfig) -> list:
    """Each question's logits (float32, on the CPU) at the positions that predict the answer given (and its end
    token), as the model reads prompt and answer in one forward pass."""
    import torch

    out = []
    for rec, answer in zip(records, answers, strict=True):
        example = tq.encode_example(processor, dataclasses.replace(rec, answer=answer), cfg.min_pixels, cfg.max_pixels)
        batch = tq.collate_batch([example], processor.tokenizer.pad_token_id)
        keep, _ = answer_positions(batch.pop("labels"))
        device = next(model.parameters()).device
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=keep.to(device)).logits
        out.append(logits[0].float().cpu())
    return out


def compare_question(row: dict, tolerance: float = LOGIT_TOLERANCE) -> list[str]:
    """What is wrong with the merged model on one question (nothing: []). `row`: the two answers, and along the
    adapter model's answer: merge_diff (the largest |merged - adapter| logit), adapter_effect (the largest
    |adapter - base| logit), largest_logit, and closest_margin (the adapter model's smallest gap between its top
    two tokens)."""
    allowed = tolerance * row["largest_logit"]
    problems = []
    if row["merged_answer"] != row["adapter_answer"] and row["closest_margin"] > allowed:
        problems.append(f"answers {row['merged_answer']!r} (merged) and {row['adapter_answer']!r} (adapter), with no "
                        f"near tie to explain it (the adapter model's closest top-two gap is "
                        f"{row['closest_margin']:.3f} > {allowed:.3f})")
    if row["merge_diff"] > allowed:
        problems.append(f"logits differ by up to {row['merge_diff']:.3f}, over the tolerance {allowed:.3f} "
                        f"({tolerance:g} of the largest logit, {row['largest_logit']:.2f})")
    if row["merge_diff"] >= row["adapter_effect"]:
        problems.append(f"the merged model is as far from the adapter model ({row['merge_diff']:.3f}) as the base "
                        f"is ({row['adapter_effect']:.3f}): the merge cannot be told from no merge")
    return problems


def failure_advice(failed: list[dict], base: str, stage_dir: Path) -> str:
    """What a failed check means and what to do. When on every failing question the adapter moves the logits less
    than the bf16 merge's own rounding does, the merge is not wrong: the update is too small for bf16 weights to
    hold (a stage trained briefly, or at a low lr). Then the adapter is served unmerged, or trained further."""
    if all(r["merge_diff"] >= r["adapter_effect"] for r in failed):
        largest = max(r["adapter_effect"] for r in failed)
        return (f"the adapter's update is below what bfloat16 weights can hold: it moves the logits by at most "
                f"{largest:.3f}, no more than rounding the merged weights to bfloat16 does, so the merged model "
                f"cannot be told from the base. Nothing is wrong with the adapter: serve it unmerged, as it was "
                f"trained (vllm serve {base} --enable-lora --lora-modules {stage_dir.name}={stage_dir}; or in "
                f"transformers, PeftModel.from_pretrained(base_model, \"{stage_dir}\")), or train it further "
                f"(more steps or a higher lr) and export again")
        # (measured on the 8B shape: 4 steps at 5e-5 moved the logits by 0.17 and could not be merged; 30 steps
        # at 1e-3 could, 8 of 8 answers identical)
    return (f"the merged model does not answer as the adapter does on {len(failed)} question(s): the merge went "
            "wrong; do not serve it")


def check_merged(model_path: str, stage_dir: Path, merged_dir: Path, records: list[Record],
                 cfg: StageConfig) -> list[dict]:
    """Per question: the adapter model's and the merged folder's answers and logits, compared (compare_question)."""
    import torch
    from peft import PeftModel

    processor = load_processor(model_path, cfg)
    adapter_model = PeftModel.from_pretrained(load_bf16(model_path, cfg), str(stage_dir))
    answers = generate_answers(adapter_model, processor, records, cfg, cfg.eval_batch_size, cfg.max_new_tokens,
                               progress=False)
    with_adapter = answer_logits(adapter_model, processor, records, answers, cfg)
    with adapter_model.disable_adapter():
        base = answer_logits(adapter_model, processor, records, answers, cfg)
    del adapter_model
    merged_processor = load_processor(str(merged_dir), cfg)
    merged = load_bf16(str(merged_dir), cfg)
    merged_answers = generate_answers(merged, merged_processor, records, cfg, cfg.eval_batch_size,
                                      cfg.max_new_tokens, progress=False)
    along = answer_logits(merged, merged_processor, records, answers, cfg)
    rows = []
    for rec, a, m, la, lm, lb in zip(records, answers, merged_answers, with_adapter, along, base, strict=True):
        top2 = torch.topk(la, 2, dim=-1).values
        row = {"id": rec.id, "adapter_answer": a, "merged_answer": m,
               "merge_diff": (lm - la).abs().max().item(), "adapter_effect": (lb - la).abs().max().item(),
               "largest_logit": la.abs().max().item(), "closest_margin": (top2[:, 0] - top2[:, 1]).min().item()}
        rows.append(row | {"problems": compare_question(row)})
    return rows


def export(stage_dir: Path, out_dir: Path, base: str | None, check: int, data: str | None) -> int:
    """Merge, write, check, rename into place; returns the exit code."""
    from peft import PeftModel

    cfg = stage_config(stage_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists; choose a new OUT_DIR (an export never overwrites)")
    metrics = json.loads((stage_dir / STAGE_METRICS).read_text()) if (stage_dir / STAGE_METRICS).is_file() \
        else {}
    split = data or next((p for p in (metrics.get("final_eval_file"), cfg.eval_file) if p and Path(p).exists()), None)
    if check and not split:
        raise ConfigError(f"{stage_dir} has no dev split to check on; pass --data SPLIT, or --check 0")
    records = load_records(split, cfg.system_prompt, cfg.allow_images_outside_data_dir, cfg.columns,
                           dataset_image_dir(cfg), cfg.question_type)[:check] if check else []
    base = base or cfg.model_name_or_path
    model_path = resolve_model_path(base)
    refuse_quantized_base(model_path, cfg)

    staging = Path(f"{out_dir}.exporting")
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that was stopped
    processor = load_processor(model_path, cfg)  # with the stage's pixel budget: served images resized as trained
    model = PeftModel.from_pretrained(load_bf16(model_path, cfg), str(stage_dir))
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse a merge that makes a weight NaN or inf
    merged.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))  # tokenizer, image processor, chat template
    del model, merged
    print(f"Merged {stage_dir} into {base} ({EXPORT_DTYPE}) and wrote {staging}", flush=True)

    rows = check_merged(model_path, stage_dir, staging, records, cfg) if check else []
    failed = [r for r in rows if r["problems"]]
    report = {"stage_dir": str(stage_dir.resolve()), "base": base, "dtype": EXPORT_DTYPE,
              "adapter_file_sha256": sha256_file(stage_dir / ADAPTER_WEIGHTS), "split": split,
              "questions": len(rows), "identical_answers": sum(r["merged_answer"] == r["adapter_answer"] for r in rows),
              "logit_tolerance": LOGIT_TOLERANCE, "passed": not failed, "per_question": rows}
    (staging / CHECK_FILE).write_text(json.dumps(report, indent=2))
    if rows:
        worst = max(r["merge_diff"] / r["largest_logit"] for r in rows)
        print(f"Check on {len(rows)} questions of {split}: {report['identical_answers']} of {len(rows)} answers "
              f"identical to the adapter model's (bf16 base + unmerged adapter); logits differ by at most "
              f"{worst:.2%} of the largest logit (tolerance {LOGIT_TOLERANCE:.0%}); the adapter itself moves them by "
              f"{min(r['adapter_effect'] for r in rows):.3f} or more", flush=True)
    if failed:
        for r in failed:
            print(f"  ✗ {r['id']}: " + "; ".join(r["problems"]), file=sys.stderr)
        print(f"error: the check failed on {len(failed)} of {len(rows)} questions: "
              f"{failure_advice(failed, base, stage_dir)}. The merged model is left in {staging} (not moved to "
              f"{out_dir}), with {CHECK_FILE}", file=sys.stderr)
        return 1
    staging.rename(out_dir)
    print(f"Wrote {out_dir}" + ("" if rows else " (not checked: --check 0)") + f". Serve it: vllm serve {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", help="a stage folder (its adapter, resolved_config.yaml, stage_metrics.json)")
    parser.add_argument("out_dir", help="the merged model's folder (must not exist)")
    parser.add_argument("--check", type=int, default=20, metavar="N",
                        help="compare with the adapter model on the first N dev questions (default 20; 0: no check)")
    parser.add_argument("--base", help="the unquantized base (hub id or folder), if not the one the stage recorded")
    parser.add_argument("--data", help="the split to check on (default: the stage's dev split)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    try:
        if args.check < 0:
            raise ConfigError(f"--check must be >= 0, got {args.check}")
        return export(Path(args.stage_dir), Path(args.out_dir), args.base, args.check, args.data)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
