"""Scoring answers: the model's raw text parsed into an answer of the question's type, compared with the gold one,
and the metrics over a split (accuracy with its 95% interval, P/R/F1 per question type), as a table. Pure functions,
no model; README.md, "Evaluation metrics", defines each number.

Parsing is tolerant (`B`, `b.`, `Answer: B`, `(B)`, the option's text, `A, C`, `3`). An answer that cannot be
parsed counts as wrong and is never dropped.
"""

from __future__ import annotations

import math
import re

from curriculum.records import OPTION_LETTERS, Record

PREFIXES = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|option|choice)s?\s*(?:is|are|:)?\s*[:\-]?\s*", re.I)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                            "twelve".split())}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing: raw model text -> an answer in the form of the gold answer, or None
# ---------------------------------------------------------------------------------------------------------------------


def _letter_of(item: str, options: list[str]) -> str | None:
    """One option given as its letter (`B`, `(b)`, `B.`, `B. blue`) or as its text (`blue`)."""
    letters = OPTION_LETTERS[:len(options)]
    item = item.strip().strip(".;:!()[]\"'* ").strip()
    if not item:
        return None
    by_text = {o.strip().lower(): OPTION_LETTERS[i] for i, o in enumerate(options)}
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
    letters = OPTION_LETTERS[:len(options)]
    named = {m for m in re.findall(r"\b([A-Z])\b", first_line) if m in letters}
    named |= {OPTION_LETTERS[i] for i, o in enumerate(options) if re.search(rf"\b{re.escape(o)}\b", first_line,
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


def gold_answer(rec: Record):
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

