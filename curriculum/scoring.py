"""Scoring answers: the model's raw text parsed into an answer of the question's type, compared with the gold one,
and the metrics over a split (accuracy with its 95% interval, P/R/F1 per question type), as a table. Pure functions,
no model; README.md, "Evaluation: what the model answers", defines each number.

Parsing is tolerant (`B`, `b.`, `Answer: B`, `(B)`, the option's text, `A, C`, `3`). An answer that cannot be
parsed counts as wrong and is never dropped. Free-text answers are scored as the VQA literature scores them: exact
match after the official VQA normalisation, token F1, ANLS (DocVQA), relaxed accuracy (ChartQA), and VQA accuracy
where a question has ten reference answers (VQAv2, TextVQA); a match with any reference counts.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from curriculum.records import OPTION_LETTERS, QUESTION_TYPES, Record

PREFIXES = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?(?:answer|option|choice)s?\s*(?:is|are|:)?\s*[:\-]?\s*", re.I)
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
NUMBER_WORDS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                            "twelve".split())}
# A free-text answer's own prefix ("Answer: blue", "The answer is blue"): "is" or ":" is required, so that an answer
# that merely starts with the word (`answer key`) keeps it.
FREE_TEXT_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is\b|:)\s*", re.I)


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


def parse_free_text(text: str) -> str | None:
    """A short answer: the first line, without an `Answer:` prefix; None when nothing is left. Normalisation is the
    scoring's (normalize_vqa_answer), so the text is kept as the model wrote it."""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return FREE_TEXT_PREFIX.sub("", first_line).strip() or None


def parse_answer(text: str, qtype: str, options: list[str] | None):
    """The raw output as an answer of the question's type: a letter, a sorted list of letters, a number, a short
    text; or None."""
    if qtype == "single_choice":
        return parse_single_choice(text, options)
    if qtype == "multi_label":
        return parse_multi_label(text, options)
    if qtype == "numeric":
        return parse_numeric(text)
    if qtype == "free_text":
        return parse_free_text(text)
    return text.strip() or None  # chat records: compared as text


def gold_answer(rec: Record):
    """The record's answer in parsed form (from the target text the trainer trains on); for free text, every
    reference answer (the dataset's list, or the one answer)."""
    if rec.type == "free_text":
        return list(rec.references or [rec.answer])
    return parse_answer(rec.answer, rec.type, rec.options)


def is_correct(pred, gold, qtype: str) -> bool:
    if pred is None:
        return False
    if qtype == "numeric":
        return abs(pred - gold) < 1e-9
    if qtype == "free_text":
        return exact_match(pred, gold) == 1.0
    return pred == gold


# ---------------------------------------------------------------------------------------------------------------------
# Free text: normalisation and scores as the VQA literature defines them
# ---------------------------------------------------------------------------------------------------------------------

# The official VQA evaluation's normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py), rewritten here: these
# characters are removed, or become a space where they join two words ("red/green" -> "red green"); periods are
# removed unless a digit follows (its regex's `(?!<=\d)` is a no-op, so "5." loses its period and "2.5" keeps it).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                   "!")
VQA_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
# Contractions written without their apostrophe get it back ("dont" -> "don't"), as the official map does; forms
# whose apostrophe-less spelling is another word ("were", "well", "its", "ill", "shed") are not in it, and nor are
# its rare double contractions ("couldn't've").
VQA_CONTRACTIONS = {c.replace("'", ""): c for c in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
    "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've wasn't we've weren't what'll what're what's what've when's "
    "where'd where's where've who'd who'll who's who've won't would've wouldn't y'all you'd you'll you're "
    "you've").split()}
ANLS_THRESHOLD = 0.5  # DocVQA: a normalised edit distance of 0.5 or more scores 0 (the answer is a different one)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA evaluation's normalisation: case, punctuation, number words (`two` -> `2`, `none` -> `0`),
    articles (a, an, the) and contractions. Applied to every answer here (the official script skips it when all
    ten references agree, which it can, its references being normalised already)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:
        if p + " " in text or " " + p in text or VQA_COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = VQA_PERIOD.sub("", out)
    words = [VQA_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def exact_match(pred: str | None, references: list[str]) -> float:
    """1.0 when the answer equals any reference after normalize_vqa_answer, else 0.0."""
    if pred is None:
        return 0.0
    answer = normalize_vqa_answer(pred)
    return float(any(answer == normalize_vqa_answer(r) for r in references))


def token_f1(pred: str | None, references: list[str]) -> float:
    """SQuAD's token F1 on the normalised answers (bags of words), the best over the references."""
    if pred is None:
        return 0.0
    answer = normalize_vqa_answer(pred).split()
    best = 0.0
    for ref in references:
        gold = normalize_vqa_answer(ref).split()
        if not answer or not gold:  # an empty answer matches only an empty reference
            best = max(best, float(answer == gold))
            continue
        common = sum((Counter(answer) & Counter(gold)).values())
        if common:
            precision, recall = common / len(answer), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(pred: str | None, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalized Levenshtein Similarity of one answer (Biten et al. 2019, DocVQA): the best over the
    references of 1 - NL, where NL is the edit distance over the longer string's length, or 0 when NL >= threshold.
    Answers are compared lowercased with whitespace folded, as DocVQA's evaluation does (not normalize_vqa_answer)."""
    if pred is None:
        return 0.0
    answer = " ".join(pred.lower().split())
    best = 0.0
    for ref in references:
        gold = " ".join(ref.lower().split())
        longest = max(len(answer), len(gold))
        distance = levenshtein(answer, gold) / longest if longest else 0.0
        best = max(best, 1 - distance if distance < threshold else 0.0)
    return best


def vqa_accuracy(pred: str | None, references: list[str]) -> float | None:
    """VQA accuracy (Antol et al. 2015) over ten human answers: min(matches / 3, 1), averaged over the ten subsets of
    nine references that leave one out, as the official script does; answers normalised (normalize_vqa_answer).
    None unless there are exactly ten references."""
    if len(references) != 10:
        return None
    if pred is None:
        return 0.0
    answer = normalize_vqa_answer(pred)
    gold = [normalize_vqa_answer(r) for r in references]
    return sum(min(1.0, sum(g == answer for j, g in enumerate(gold) if j != left_out) / 3)
               for left_out in range(10)) / 10


RELAXED_TOLERANCE = 0.05  # ChartQA (Masry et al. 2022, after Methani et al. 2020): a number within 5% of the gold one


def _relaxed_number(text: str) -> float | None:
    """The number a ChartQA answer is (`12.5`; `40%` is 0.4), or None for text."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str | None, references: list[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy of one answer, as pix2struct's relaxed_correctness computes the figures ChartQA
    results are reported with: where both are numbers, right within `tolerance` of the reference, relative to it;
    otherwise (text, or a reference of 0, which has no relative change) the same text, case aside. 1.0 or 0.0, the
    best over the references. No VQA normalisation: `two` is not 2 here, as it is not in ChartQA's evaluation."""
    if pred is None:
        return 0.0
    answer = pred.strip()
    number = _relaxed_number(answer)
    for ref in references:
        gold = ref.strip()
        gold_number = _relaxed_number(gold)
        if number is not None and gold_number:
            if abs(number - gold_number) / abs(gold_number) <= tolerance:
                return 1.0
        elif answer.lower() == gold.lower():
            return 1.0
    return 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: pure functions over (type, gold, pred) rows
# ---------------------------------------------------------------------------------------------------------------------


def wilson_interval(correct: float, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval for an accuracy of correct/n (sound for small n and for 0% or 100%). For the mean
    of scores in [0, 1] (token F1, ANLS, VQA accuracy) `correct` is their sum: a score with mean p has a variance of
    at most p(1 - p), the variance the interval assumes, so it is never narrower than the score's own."""
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


def _mean_score(scores: list[float], name: str) -> dict:
    """{name: the mean, name_ci95: its Wilson interval} of scores in [0, 1]."""
    return {name: round(sum(scores) / len(scores), 4) if scores else None,
            f"{name}_ci95": wilson_interval(sum(scores), len(scores))}


def free_text_metrics(rows: list[dict]) -> dict:
    """Free-text rows ({"gold": the references, "pred": the answer or None}): exact match (the type's accuracy),
    token F1, ANLS, ChartQA's relaxed accuracy, each with its interval; VQA accuracy over the rows with ten
    references (vqa_accuracy_n)."""
    matches = sum(is_correct(r["pred"], r["gold"], "free_text") for r in rows)
    vqa = [v for v in (vqa_accuracy(r["pred"], r["gold"]) for r in rows) if v is not None]
    return {**_accuracy(matches, len(rows)), "exact_match": round(matches / len(rows), 4),
            **_mean_score([token_f1(r["pred"], r["gold"]) for r in rows], "token_f1"),
            **_mean_score([anls(r["pred"], r["gold"]) for r in rows], "anls"),
            **_mean_score([relaxed_accuracy(r["pred"], r["gold"]) for r in rows], "relaxed_accuracy"),
            **_mean_score(vqa, "vqa_accuracy"), "vqa_accuracy_n": len(vqa),
            "unparseable": sum(r["pred"] is None for r in rows)}


def compute_metrics(rows: list[dict], numeric_tolerance: float) -> dict:
    """Rows: {"type", "gold", "pred"} with parsed answers (pred None when unparseable). See README for definitions."""
    out = {}
    overall_correct = tp = fp = fn = 0
    for row in rows:
        row_correct = is_correct(row["pred"], row["gold"], row["type"])
        overall_correct += row_correct
        if row["type"] == "free_text":  # one item: the answer, right (tp) or wrong (a miss, and a false one if given)
            tp, fp, fn = tp + row_correct, fp + (not row_correct and row["pred"] is not None), fn + (not row_correct)
            continue
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

    free = [r for r in rows if r["type"] == "free_text"]
    if free:
        out["free_text"] = free_text_metrics(free)
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def metrics_table(metrics: dict) -> str:
    """A Markdown table: accuracy with its 95% interval and count, P/R/F1, per question type and overall."""
    lines = ["| questions | n | accuracy (95% CI) | precision | recall | F1 | other |", "|---|---|---|---|---|---|---|"]
    for kind in (*QUESTION_TYPES, "overall"):
        m = metrics.get(kind)
        if not m:
            continue
        ci = m["accuracy_ci95"]
        acc = f"{m['accuracy']:.1%} ({ci[0]:.0%}–{ci[1]:.0%})"
        p = m.get("macro_precision", m.get("micro_precision", m.get("precision")))
        r = m.get("macro_recall", m.get("micro_recall", m.get("recall")))
        f = m.get("macro_f1", m.get("micro_f1", m.get("f1", m.get("token_f1"))))
        if kind == "free_text":  # accuracy is the exact match; F1 the mean token F1
            vqa = (f"; VQA accuracy {m['vqa_accuracy']:.1%} (n={m['vqa_accuracy_n']})" if m["vqa_accuracy_n"]
                   else "")
            relaxed = (f"; relaxed accuracy {m['relaxed_accuracy']:.1%}" if "relaxed_accuracy" in m
                       else "")  # a stage's metrics from before it was computed
            other = f"exact match; token F1; ANLS {m['anls']:.3f}{relaxed}{vqa}"
        else:
            other = (f"within ±{m['tolerance']:g}: {m['accuracy_within_tolerance']:.1%}; MAE {m['mae']}"
                     if kind == "numeric" else "macro" if kind == "single_choice" else "micro")
        lines.append(f"| {kind} | {m['n']} | {acc} | {_fmt(p)} | {_fmt(r)} | {_fmt(f)} | {other}; "
                     f"unparseable {m['unparseable']} |")
    return "\n".join(lines)

