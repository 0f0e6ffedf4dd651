"""Evaluate curriculum stages by what the model answers: parse, score, compare across stages, plot.

    python vqa_eval.py configs/demo/stage2.yaml --split test             # that stage's adapter on its test split
    python vqa_eval.py configs/demo/stage2.yaml --data my.jsonl --limit 50
    python vqa_eval.py configs/demo/stage1.yaml --split eval --no-adapter  # the base model: the zero point
    python vqa_eval.py --forgetting models/demo_curriculum               # every stage x every stage's dev split

Answers come from batched greedy decoding with the chat template. They are parsed tolerantly (`B`, `b.`,
`Answer: B`, `(B)`, the option's text, `A, C`, `3`). An answer that cannot be parsed counts as wrong and is
never dropped. Metrics are defined in README.md, "Evaluation metrics".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import train_qlora_qwen3vl as tq
from curriculum import forgetting, speed
from curriculum.processes import gather_from_processes, is_main_process, log, processes

PREFIXES = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|option|choice)s?\s*(?:is|are|:)?\s*[:\-]?\s*", re.I)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                            "twelve".split())}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing: raw model text -> an answer in the form of the gold answer, or None
# ---------------------------------------------------------------------------------------------------------------------


def _letter_of(item: str, options: list[str]) -> str | None:
    """One option given as its letter (`B`, `(b)`, `B.`, `B. blue`) or as its text (`blue`)."""
    letters = tq.OPTION_LETTERS[:len(options)]
    item = item.strip().strip(".;:!()[]\"'* ").strip()
    if not item:
        return None
    by_text = {o.strip().lower(): tq.OPTION_LETTERS[i] for i, o in enumerate(options)}
    if item.lower() in by_text:
        return by_text[item.lower()]
    match = re.match(r"^\(?([A-Za-z])\)?(?:[.):]\s*(.*))?$", item)
    if match and match.group(1).upper() in letters:
        letter, rest = match.group(1).upper(), (match.group(2) or "").strip().lower().rstrip(".")
        if not rest or by_text.get(rest) == letter:  # `B. blue` must name option B's own text
            return letter
    return None


def parse_single_choice(text: str, options: list[str]) -> str | None:
    text = PREFIXES.sub("", text.strip())
    first_line = text.splitlines()[0] if text else ""
    letter = _letter_of(first_line, options)
    if letter:
        return letter
    # a sentence: accept it only if exactly one option letter or text is named in it
    letters = tq.OPTION_LETTERS[:len(options)]
    named = {m for m in re.findall(r"\b([A-Z])\b", first_line) if m in letters}
    named |= {tq.OPTION_LETTERS[i] for i, o in enumerate(options) if re.search(rf"\b{re.escape(o)}\b", first_line,
                                                                                 re.I)}
    return named.pop() if len(named) == 1 else None


def parse_multi_label(text: str, options: list[str]) -> list[str] | None:
    text = PREFIXES.sub("", text.strip())
    first_line = text.splitlines()[0] if text else ""
    items = [i for i in re.split(r",|;|/|\band\b|&|\s+(?=\(?[A-Z]\)?(?:[.):,]|\s|$))", first_line) if i.strip()]
    letters = [_letter_of(i, options) for i in items]
    if not letters or any(lt is None for lt in letters):
        return None
    return sorted(set(letters))


def parse_numeric(text: str) -> float | None:
    text = PREFIXES.sub("", text.strip())
    match = NUMBER.search(text)
    if match:
        return float(match.group())
    word = re.search(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", text, re.I)
    return float(NUMBER_WORDS[word.group(1).lower()]) if word else None


def parse_answer(text: str, qtype: str, options: list[str] | None):
    """The raw output as an answer of the question's type: a letter, a sorted list of letters, a number; or None."""
    if qtype == "single_choice":
        return parse_single_choice(text, options)
    if qtype == "multi_label":
        return parse_multi_label(text, options)
    if qtype == "numeric":
        return parse_numeric(text)
    return text.strip() or None  # chat records: compared as text


def gold_answer(rec: tq.Record):
    """The record's answer in parsed form (from the target text the trainer trains on)."""
    return parse_answer(rec.answer, rec.type, rec.options)


def is_correct(pred, gold, qtype: str) -> bool:
    if pred is None:
        return False
    if qtype == "numeric":
        return abs(pred - gold) < 1e-9
    return pred == gold


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions over (type, gold, pred) rows
# ---------------------------------------------------------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval for an accuracy of correct/n (sound for small n and for 0% or 100%)."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _prf_exact(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _prf(tp: int, fp: int, fn: int) -> dict:
    return {k: round(v, 4) for k, v in _prf_exact(tp, fp, fn).items()}


def _accuracy(correct: int, n: int) -> dict:
    return {"accuracy": round(correct / n, 4) if n else None, "accuracy_ci95": wilson_interval(correct, n),
            "n": n, "correct": correct}


def answer_items(answer, qtype: str) -> set:
    """An answer as a set of items for micro-averaged P/R/F1: a letter, a number, or the selected letters."""
    if answer is None:
        return set()
    return set(answer) if qtype == "multi_label" else {answer}


def compute_metrics(rows: list[dict], numeric_tolerance: float) -> dict:
    """Rows: {"type", "gold", "pred"} with parsed answers (pred None when unparseable). See README for definitions."""
    out = {}
    overall_correct = tp = fp = fn = 0
    for row in rows:
        row_correct = is_correct(row["pred"], row["gold"], row["type"])
        overall_correct += row_correct
        gold, pred = answer_items(row["gold"], row["type"]), answer_items(row["pred"], row["type"])
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
    out["overall"] = {**_accuracy(overall_correct, len(rows)), **_prf(tp, fp, fn),
                      "unparseable": sum(r["pred"] is None for r in rows)}

    single = [r for r in rows if r["type"] == "single_choice"]
    if single:
        labels = sorted({r["gold"] for r in single} | {r["pred"] for r in single if r["pred"] is not None})
        per_label = {lab: _prf_exact(sum(r["pred"] == lab and r["gold"] == lab for r in single),
                                     sum(r["pred"] == lab and r["gold"] != lab for r in single),
                                     sum(r["gold"] == lab and r["pred"] != lab for r in single)) for lab in labels}
        macro = {k: round(sum(p[k] for p in per_label.values()) / len(per_label), 4)
                 for k in ("precision", "recall", "f1")}
        per_label = {lab: {k: round(v, 4) for k, v in p.items()} for lab, p in per_label.items()}
        out["single_choice"] = {**_accuracy(sum(r["pred"] == r["gold"] for r in single), len(single)),
                                **{f"macro_{k}": v for k, v in macro.items()}, "per_option": per_label,
                                "unparseable": sum(r["pred"] is None for r in single)}

    numeric = [r for r in rows if r["type"] == "numeric"]
    if numeric:
        parsed = [r for r in numeric if r["pred"] is not None]
        within = sum(abs(r["pred"] - r["gold"]) <= numeric_tolerance for r in parsed)
        out["numeric"] = {**_accuracy(sum(is_correct(r["pred"], r["gold"], "numeric") for r in numeric), len(numeric)),
                          "tolerance": numeric_tolerance, "accuracy_within_tolerance": round(within / len(numeric), 4),
                          "accuracy_within_tolerance_ci95": wilson_interval(within, len(numeric)),
                          "mae": round(sum(abs(r["pred"] - r["gold"]) for r in parsed) / len(parsed), 4)
                          if parsed else None, "mae_n": len(parsed), "unparseable": len(numeric) - len(parsed)}

    multi = [r for r in rows if r["type"] == "multi_label"]
    if multi:
        m_tp = sum(len(set(r["gold"]) & set(r["pred"] or [])) for r in multi)
        m_fp = sum(len(set(r["pred"] or []) - set(r["gold"])) for r in multi)
        m_fn = sum(len(set(r["gold"]) - set(r["pred"] or [])) for r in multi)
        out["multi_label"] = {**_accuracy(sum(r["pred"] == r["gold"] for r in multi), len(multi)),
                              **{f"micro_{k}": v for k, v in _prf(m_tp, m_fp, m_fn).items()},
                              "unparseable": sum(r["pred"] is None for r in multi)}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Generation: batched greedy decoding with the chat template
# ---------------------------------------------------------------------------------------------------------------------


class GenerationInputs:
    """Records -> one left-padded batch of model inputs (chat template, image decode and resize, tokenise). Run as
    a DataLoader's collate function, so the next batch is prepared in a worker while the GPU generates."""

    def __init__(self, processor, min_pixels: int, max_pixels: int):
        self.processor, self.min_pixels, self.max_pixels = processor, min_pixels, max_pixels

    def __call__(self, batch: list[tq.Record]):
        processor = self.processor
        prompts = [tq.prompt_and_images(processor, r, self.min_pixels, self.max_pixels) for r in batch]
        texts = [text for text, _ in prompts]
        images = [img for _, imgs in prompts for img in imgs]
        # left padding, so every prompt ends where generation starts
        old_side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
        try:
            return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            processor.tokenizer.padding_side = old_side


def generate_answers(model, processor, records: list[tq.Record], cfg: tq.StageConfig, batch_size: int,
                     max_new_tokens: int, progress: bool = True) -> list[str]:
    """Raw answers, in the order of `records`, greedy. Inputs are prepared in cfg.dataloader_num_workers worker
    processes, one batch ahead of the GPU."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    device = next(p for p in model.parameters()).device
    workers = min(cfg.dataloader_num_workers, math.ceil(len(records) / batch_size) - 1)  # none for one batch
    batches = DataLoader(records, batch_size=batch_size, shuffle=False, num_workers=max(workers, 0),
                         collate_fn=GenerationInputs(processor, cfg.min_pixels, cfg.max_pixels),
                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for inputs in tqdm(batches, desc="generate", disable=not progress):
            inputs = inputs.to(device, non_blocking=True)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def merge_answers(parts: list[list[tuple[int, str]]], n: int) -> list[str]:
    """The (index, answer) pairs of every process, as one list in question order; a question answered twice or
    not at all is an error, never a silently wrong count."""
    by_index: dict[int, str] = {}
    for part in parts:
        for i, text in part:
            if i in by_index:
                raise RuntimeError(f"question {i} was answered by two processes")
            by_index[i] = text
    missing = sorted(set(range(n)) - by_index.keys())
    if missing or len(by_index) != n:
        raise RuntimeError(f"{len(missing)} of {n} questions got no answer from any process, e.g. {missing[:5]}")
    return [by_index[i] for i in range(n)]


def evaluate_records(model, processor, records: list[tq.Record], cfg: tq.StageConfig) -> tuple[dict, list[dict]]:
    """Generate, parse and score. Returns (metrics, predictions) with one prediction row per record. With several
    processes (DDP), each answers every N-th question and all answers are gathered on every process."""
    state = processes()
    mine = list(range(state.process_index, len(records), state.num_processes))
    answers = generate_answers(model, processor, [records[i] for i in mine], cfg, cfg.eval_batch_size,
                               cfg.max_new_tokens, progress=is_main_process())
    raw = merge_answers(gather_from_processes(list(zip(mine, answers, strict=True))), len(records))
    predictions = []
    for rec, text in zip(records, raw, strict=True):
        gold, pred = gold_answer(rec), parse_answer(text, rec.type, rec.options)
        # what was asked, as the model read it: the chat template's text (the image as its placeholder token) and
        # the image's file (absolute), so that an answer can be reproduced without this code
        prompt = processor.apply_chat_template(rec.prompt_messages, add_generation_prompt=True, tokenize=False)
        image = os.path.abspath(rec.image) if rec.image else None
        predictions.append({"id": rec.id, "type": rec.type, "image": image, "prompt": prompt, "raw_output": text,
                            "parsed": pred, "gold": gold, "correct": is_correct(pred, gold, rec.type)})
    rows = [{"type": p["type"], "gold": p["gold"], "pred": p["parsed"]} for p in predictions]
    return compute_metrics(rows, cfg.numeric_tolerance), predictions


def write_predictions(predictions: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def metrics_table(metrics: dict) -> str:
    """A Markdown table: accuracy with its 95% interval and count, P/R/F1, per question type and overall."""
    lines = ["| questions | n | accuracy (95% CI) | precision | recall | F1 | other |", "|---|---|---|---|---|---|---|"]
    for kind in ("single_choice", "numeric", "multi_label", "overall"):
        m = metrics.get(kind)
        if not m:
            continue
        ci = m["accuracy_ci95"]
        acc = f"{m['accuracy']:.1%} ({ci[0]:.0%}–{ci[1]:.0%})"
        p = m.get("macro_precision", m.get("micro_precision", m.get("precision")))
        r = m.get("macro_recall", m.get("micro_recall", m.get("recall")))
        f = m.get("macro_f1", m.get("micro_f1", m.get("f1")))
        other = (f"within ±{m['tolerance']:g}: {m['accuracy_within_tolerance']:.1%}; MAE {m['mae']}"
                 if kind == "numeric" else "macro" if kind == "single_choice" else "micro")
        lines.append(f"| {kind} | {m['n']} | {acc} | {_fmt(p)} | {_fmt(r)} | {_fmt(f)} | {other}; "
                     f"unparseable {m['unparseable']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def stage_chain(stage_dir: Path) -> list[tuple[Path, dict]]:
    """This stage and every stage before it, oldest first, by following prev_checkpoint."""
    chain, current = [], Path(stage_dir)
    while current is not None and (current / tq.STAGE_METRICS).is_file():
        m = json.loads((current / tq.STAGE_METRICS).read_text())
        chain.append((current, m))
        current = tq.previous_stage_dir(current, m.get("prev_checkpoint"))
    return chain[::-1]


def _pyplot():
    """matplotlib's pyplot on the file-only backend: plots are written to PNG, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(chain: list[tuple[Path, dict]], path: Path) -> None:
    """Train loss of each stage, and one line per dev split across all stages (in its own stage, its evaluations;
    in later stages, their watch of it: forgetting shows as a line that climbs), on one step axis with the stage
    boundaries marked: a restart shows as a jump. A dev split's line has its stage's colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset = 0
    colour = {}
    for i, (_, m) in enumerate(chain):
        colour[f"stage {m['stage']} dev"] = plt.cm.tab10(i)
        train = m.get("train_loss_history", [])
        ax.plot([offset + h["step"] for h in train], [h["loss"] for h in train], color=plt.cm.tab10(i), alpha=0.5,
                label=f"stage {m['stage']} train")
        if i:  # the label's height is in axes coordinates, so later stages cannot move it off the top
            ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"stage {m['stage']} starts", (offset, 1), xycoords=ax.get_xaxis_transform(),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        offset += m.get("global_steps", 0)
    for name, points in forgetting.dev_split_series([m for _, m in chain]).items():
        ax.plot([s for s, _ in points], [v for _, v in points], "o--", color=colour.get(name, "black"),
                markersize=5, label=name)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.set_title("Loss across the curriculum: each dev split's line must carry on across the dotted boundaries")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_by_type(chain: list[tuple[Path, dict]], path: Path) -> None:
    """Grouped bars: dev-split accuracy per question type, one group per stage, with 95% intervals."""
    plt = _pyplot()
    kinds = ["single_choice", "numeric", "multi_label", "overall"]
    stages = [(m["stage"], m.get("dev_metrics")) for _, m in chain if m.get("dev_metrics")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(stages), 1)
    for i, (stage, metrics) in enumerate(stages):
        xs, ys, errs = [], [], [[], []]
        for k, kind in enumerate(kinds):
            m = metrics.get(kind)
            if not m or m["accuracy"] is None:
                continue
            xs.append(k + (i - (len(stages) - 1) / 2) * width)
            ys.append(m["accuracy"])
            errs[0].append(m["accuracy"] - m["accuracy_ci95"][0])
            errs[1].append(m["accuracy_ci95"][1] - m["accuracy"])
        ax.bar(xs, ys, width=width * 0.95, yerr=errs, capsize=3, label=f"after stage {stage}")
    ax.set_xticks(range(len(kinds)), [k.replace("_", " ") for k in kinds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on the stage's dev split")
    ax.set_title("Accuracy by question type (bars: 95% Wilson intervals)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forgetting(matrix: dict, path: Path) -> None:
    plt = _pyplot()
    rows, cols = matrix["trained"], matrix["evaluated"]
    values = [[matrix["accuracy"][r][c] for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(cols)), [f"stage {c} dev" for c in cols])
    ax.set_yticks(range(len(rows)), [("base" if r == "base" else f"after stage {r}") for r in rows])
    ax.set_title("Forgetting matrix: accuracy")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_stage_plots(stage_dir: Path) -> list[Path]:
    chain = stage_chain(stage_dir)
    paths = [stage_dir / "loss_curve.png"]
    plot_loss_curve(chain, paths[0])
    if any(m.get("dev_metrics") for _, m in chain):
        paths.append(stage_dir / "accuracy_by_type.png")
        plot_accuracy_by_type(chain, paths[1])
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------


def load_for_eval(cfg: tq.StageConfig, adapter: str | None):
    """Base (4-bit, as trained) with the adapter opened for inference, or the bare base as the zero point."""
    from peft import PeftModel

    model_path = tq.resolve_model_path(cfg.model_name_or_path)
    processor = tq.load_processor(model_path, cfg)
    model = tq.load_quantized_base(model_path, cfg)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    speed.apply_speed_patches(model, cfg, log=log)
    return model, processor


def evaluate_forgetting(root: Path, limit: int | None) -> dict:
    """Every stage's adapter on every stage's dev split, plus the base model as row zero."""
    stages = [(s, json.loads((s / tq.STAGE_METRICS).read_text())) for s in tq.curriculum_stage_dirs(root)]
    if not stages:
        raise tq.ConfigError(f"{root} holds no stage directories (with {tq.STAGE_METRICS})")
    cfg = tq.load_config(stages[0][0] / tq.RESOLVED_CONFIG)
    model, processor = load_for_eval(cfg, str(stages[0][0]))
    for stage_dir, m in stages[1:]:
        model.load_adapter(str(stage_dir), adapter_name=f"stage{m['stage']}")
    splits = {m["stage"]: tq.load_records(m["final_eval_file"], cfg.system_prompt, cfg.allow_images_outside_data_dir,
                                          cfg.columns, tq.dataset_image_dir(cfg)) for _, m in stages}
    if limit:
        splits = {k: v[:limit] for k, v in splits.items()}
    result = {"trained": ["base"] + [m["stage"] for _, m in stages], "evaluated": list(splits),
              "accuracy": {}, "n": {k: len(v) for k, v in splits.items()}}
    for row in result["trained"]:
        result["accuracy"][row] = {}
        for col, records in splits.items():
            if row == "base":
                with model.disable_adapter():
                    metrics, _ = evaluate_records(model, processor, records, cfg)
            else:
                model.set_adapter("default" if row == stages[0][1]["stage"] else f"stage{row}")
                metrics, _ = evaluate_records(model, processor, records, cfg)
            result["accuracy"][row][col] = metrics["overall"]["accuracy"]
            print(f"{'base' if row == 'base' else f'after stage {row}'} on stage {col} dev: "
                  f"{metrics['overall']['accuracy']:.1%} of {len(records)}", flush=True)
    return result


def forgetting_markdown(matrix: dict) -> str:
    header = "| trained \\ evaluated | " + " | ".join(f"stage {c} dev (n={matrix['n'][c]})"
                                                     for c in matrix["evaluated"]) + " |"
    lines = [header, "|---" * (len(matrix["evaluated"]) + 1) + "|"]
    for r in matrix["trained"]:
        label = "base (no adapter)" if r == "base" else f"after stage {r}"
        lines.append(f"| {label} | " + " | ".join(f"{matrix['accuracy'][r][c]:.1%}" for c in matrix["evaluated"])
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="stage YAML: its base, adapter (output_dir) and splits")
    parser.add_argument("--split", choices=["train", "eval", "test"], default="eval")
    parser.add_argument("--data", help="evaluate on this split (JSONL or a dataset) instead of one of the config's")
    parser.add_argument("--adapter", help="adapter directory (default: the config's output_dir)")
    parser.add_argument("--no-adapter", action="store_true", help="the base model alone: the zero point")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--out", help="directory for metrics and predictions (default: the adapter's)")
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
        cfg = tq.load_config(args.config, args.set)
        data = args.data or {"train": cfg.train_file, "eval": cfg.eval_file, "test": cfg.test_file}[args.split]
        if not data or not Path(data).exists():
            raise tq.ConfigError(f"no {args.split} split: set {args.split}_file in {args.config} or pass --data")
        adapter = None if args.no_adapter else (args.adapter or cfg.output_dir)
        if adapter and not (Path(adapter) / tq.ADAPTER_WEIGHTS).is_file():
            raise tq.ConfigError(f"no adapter in {adapter} (train the stage first, or pass --adapter/--no-adapter)")
        records = tq.load_records(data, cfg.system_prompt, cfg.allow_images_outside_data_dir, cfg.columns,
                                  tq.dataset_image_dir(cfg))[:args.limit]
        model, processor = load_for_eval(cfg, adapter)
        metrics, predictions = evaluate_records(model, processor, records, cfg)
    except tq.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or adapter or ".")
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
