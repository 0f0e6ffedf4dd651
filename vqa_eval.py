"""Evaluate curriculum stages by what the model answers: parse, score, compare across stages, plot.

    python vqa_eval.py configs/demo/stage2.yaml --split test             # that stage's adapter on its test split
    python vqa_eval.py configs/demo/stage2.yaml --data my.jsonl --limit 50
    python vqa_eval.py configs/demo/stage1.yaml --split eval --no-adapter  # the base model: the zero point
    python vqa_eval.py --forgetting models/demo_curriculum               # every stage x every stage's dev split

Answers come from batched greedy decoding with the chat template (curriculum/evaluation.py). They are parsed
tolerantly (`B`, `b.`, `Answer: B`, `(B)`, the option's text, `A, C`, `3`; curriculum/scoring.py). An answer that
cannot be parsed counts as wrong and is never dropped. Free-text answers are scored by exact match, token F1, ANLS,
relaxed accuracy (ChartQA) and (with ten references) VQA accuracy. Metrics are defined in README.md,
"Evaluation: what the model answers".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import train_qlora_qwen3vl as tq
from curriculum import speed
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.base_model import load_processor, resolve_model_path
from curriculum.config import StageConfig, load_config
from curriculum.data_files import dataset_image_dir, load_records
from curriculum.errors import ConfigError
from curriculum.evaluation import evaluate_records, write_predictions
from curriculum.plots import plot_forgetting
from curriculum.processes import print_main
from curriculum.records import QUESTION_TYPES
from curriculum.scoring import metrics_table
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS, curriculum_stage_dirs

# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def load_for_eval(cfg: StageConfig, adapter: str | None):
    """Base (4-bit, as trained) with the adapter opened for inference, or the bare base as the zero point."""
    from peft import PeftModel

    model_path = resolve_model_path(cfg.model_name_or_path)
    processor = load_processor(model_path, cfg)
    model = tq.load_quantized_base(model_path, cfg)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    speed.apply_speed_patches(model, cfg, say=print_main)
    return model, processor


def evaluate_forgetting(root: Path, limit: int | None) -> dict:
    """Every stage's adapter on every stage's dev split, plus the base model as row zero: the overall accuracy, and
    each question type's metrics (`by_type`: accuracy with its interval; free text's other scores too)."""
    stages = [(s, json.loads((s / STAGE_METRICS).read_text())) for s in curriculum_stage_dirs(root)]
    if not stages:
        raise ConfigError(f"{root} holds no stage directories (with {STAGE_METRICS})")
    cfg = load_config(stages[0][0] / RESOLVED_CONFIG)
    model, processor = load_for_eval(cfg, str(stages[0][0]))
    for stage_dir, m in stages[1:]:
        model.load_adapter(str(stage_dir), adapter_name=f"stage{m['stage']}")
    splits = {}
    for stage_dir, m in stages:  # each dev split read with the columns and question_type of the stage it is from
        own = load_config(stage_dir / RESOLVED_CONFIG)
        splits[m["stage"]] = load_records(m["final_eval_file"], cfg.system_prompt, cfg.allow_images_outside_data_dir,
                                          own.columns, dataset_image_dir(cfg), own.question_type)
    if limit:
        splits = {k: v[:limit] for k, v in splits.items()}
    result = {"trained": ["base"] + [m["stage"] for _, m in stages], "evaluated": list(splits),
              "accuracy": {}, "by_type": {}, "n": {k: len(v) for k, v in splits.items()}}
    for row in result["trained"]:
        result["accuracy"][row], result["by_type"][row] = {}, {}
        for col, records in splits.items():
            if row == "base":
                with model.disable_adapter():
                    metrics, _ = evaluate_records(model, processor, records, cfg)
            else:
                model.set_adapter("default" if row == stages[0][1]["stage"] else f"stage{row}")
                metrics, _ = evaluate_records(model, processor, records, cfg)
            result["accuracy"][row][col] = metrics["overall"]["accuracy"]
            result["by_type"][row][col] = {kind: metrics[kind] for kind in QUESTION_TYPES if kind in metrics}
            print(f"{'base' if row == 'base' else f'after stage {row}'} on stage {col} dev: "
                  f"{metrics['overall']['accuracy']:.1%} of {len(records)}", flush=True)
    return result


def type_cell(m: dict | None) -> str:
    """One question type's cell: accuracy (free text: exact match) with its 95% interval and n; ANLS for free text."""
    if not m:
        return "–"
    lo, hi = m["accuracy_ci95"]
    anls = f", ANLS {m['anls']:.3f}" if "anls" in m else ""
    return f"{m['accuracy']:.1%} ({lo:.0%}–{hi:.0%}, n={m['n']}){anls}"


def forgetting_markdown(matrix: dict) -> str:
    """The overall accuracy of every stage on every dev split, then a table per question type met in the splits."""
    def table(cell) -> list[str]:
        header = "| trained \\ evaluated | " + " | ".join(f"stage {c} dev (n={matrix['n'][c]})"
                                                         for c in matrix["evaluated"]) + " |"
        lines = [header, "|---" * (len(matrix["evaluated"]) + 1) + "|"]
        for r in matrix["trained"]:
            label = "base (no adapter)" if r == "base" else f"after stage {r}"
            lines.append(f"| {label} | " + " | ".join(cell(r, c) for c in matrix["evaluated"]) + " |")
        return lines

    lines = table(lambda r, c: f"{matrix['accuracy'][r][c]:.1%}")
    by_type = matrix.get("by_type") or {}  # absent in a matrix written before it was recorded
    kinds = [k for k in QUESTION_TYPES if any(k in cells for row in by_type.values() for cells in row.values())]
    for kind in kinds:
        what = "exact match" if kind == "free_text" else "accuracy"
        lines += ["", f"{kind} ({what}, 95% interval):", "", *table(lambda r, c, k=kind: type_cell(
            by_type.get(r, {}).get(c, {}).get(k)))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="stage YAML: its base, adapter (output_dir) and splits")
    parser.add_argument("--split", choices=["train", "eval", "test"], default="eval")
    parser.add_argument("--data", help="evaluate on this split (JSONL or a dataset) instead of one of the config's")
    parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir)")
    parser.add_argument("--no-adapter", action="store_true", help="the base model alone: the zero point")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--out", help="directory for metrics and predictions (default: the adapter's; with "
                        "--no-adapter, base_model_eval/ beside the config's output_dir)")
    parser.add_argument("--forgetting", metavar="ROOT", help="every stage under ROOT on every stage's dev split")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    args = parser.parse_args(argv)
    try:
        if args.forgetting:
            root = Path(args.forgetting)
            matrix = evaluate_forgetting(root, args.limit)
            (root / "forgetting_matrix.json").write_text(json.dumps(matrix, indent=2))
            (root / "forgetting_matrix.md").write_text(forgetting_markdown(matrix) + "\n")
            plot_forgetting(matrix, root / "forgetting_matrix.png")
            print(forgetting_markdown(matrix))
            print(f"Wrote {root}/forgetting_matrix.{{md,json,png}}")
            return 0
        if not args.config:
            parser.error("give a CONFIG.yaml, or --forgetting ROOT")
        cfg = load_config(args.config, args.set)
        data = args.data or {"train": cfg.train_file, "eval": cfg.eval_file, "test": cfg.test_file}[args.split]
        if not data or not Path(data).exists():
            raise ConfigError(f"no {args.split} split: set {args.split}_file in {args.config} or pass --data")
        adapter = None if args.no_adapter else (args.adapter or cfg.output_dir)
        if adapter and not (Path(adapter) / ADAPTER_WEIGHTS).is_file():
            raise ConfigError(f"no adapter in {adapter} (train the stage first, or pass --adapter/--no-adapter)")
        records = load_records(data, cfg.system_prompt, cfg.allow_images_outside_data_dir, cfg.columns,
                               dataset_image_dir(cfg), cfg.question_type)[:args.limit]
        model, processor = load_for_eval(cfg, adapter)
        metrics, predictions = evaluate_records(model, processor, records, cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the base alone has no folder of its own: beside the stages, never the directory this was run from
    out = Path(args.out or adapter or Path(cfg.output_dir).parent / "base_model_eval")
    out.mkdir(parents=True, exist_ok=True)
    name = Path(data).stem if args.data else args.split
    tag = "base" if args.no_adapter else "adapter"
    (out / f"metrics_{name}_{tag}.json").write_text(json.dumps({"data": str(data), "adapter": adapter,
                                                                "metrics": metrics}, indent=2))
    write_predictions(predictions, out / f"predictions_{name}_{tag}.jsonl")
    print(metrics_table(metrics))
    print(f"Wrote {out}/metrics_{name}_{tag}.json and predictions_{name}_{tag}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
