"""Answer parsing and metrics, pinned on hand-computed cases. No model (the processor alone renders prompts)."""

import types

import pytest

from curriculum import scoring

OPTS = ["red", "green", "blue", "yellow"]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), (" b ", "B"), ("B.", "B"), ("(B)", "B"), ("Answer: B", "B"), ("The answer is B.", "B"),
    ("B. green", "B"), ("green", "B"), ("Green.", "B"), ("answer: blue", "C"), ("B\nbecause it is", "B"),
    ("I think it is C", "C"),
    ("B. blue", None),        # letter and text disagree
    ("E", None),              # not an option
    ("", None), ("purple", None), ("A or B", None),
])
def test_parse_single_choice(text, expected):
    assert scoring.parse_answer(text, "single_choice", OPTS) == expected


@pytest.mark.parametrize("text, expected", [
    ("A, C", ["A", "C"]), ("C,A", ["A", "C"]), ("A and C", ["A", "C"]), ("a; c; a", ["A", "C"]),
    ("Answer: red, blue", ["A", "C"]), ("(A) (C)", ["A", "C"]), ("D", ["D"]),
    ("A, E", None), ("", None), ("none", None),
])
def test_parse_multi_label(text, expected):
    assert scoring.parse_answer(text, "multi_label", OPTS) == expected


@pytest.mark.parametrize("text, expected", [
    ("3", 3.0), (" 12 ", 12.0), ("Answer: 4.", 4.0), ("There are 2 circles", 2.0), ("-1", -1.0),
    ("two", 2.0), ("2.5", 2.5), ("many", None), ("", None),
])
def test_parse_numeric(text, expected):
    assert scoring.parse_answer(text, "numeric", None) == expected


def row(qtype, gold, pred):
    return {"type": qtype, "gold": gold, "pred": pred}


def test_single_choice_metrics_by_hand():
    rows = [row("single_choice", "A", "A"), row("single_choice", "A", "B"), row("single_choice", "B", "B"),
            row("single_choice", "C", None)]
    m = scoring.compute_metrics(rows, 1.0)["single_choice"]
    assert (m["accuracy"], m["n"], m["correct"], m["unparseable"]) == (0.5, 4, 2, 1)
    # labels A, B, C (gold or predicted). A: tp1 fp0 fn1 -> P1 R.5 F.667; B: tp1 fp1 fn0 -> P.5 R1 F.667;
    # C: tp0 fp0 fn1 -> P0 R0 F0 (the unparseable answer is a miss, not a class)
    assert m["per_option"]["A"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667}
    assert m["per_option"]["B"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667}
    assert m["per_option"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == (0.5, 0.5, 0.4444)


def test_numeric_metrics_by_hand():
    rows = [row("numeric", 3.0, 3.0), row("numeric", 3.0, 4.0), row("numeric", 5.0, 1.0), row("numeric", 2.0, None)]
    m = scoring.compute_metrics(rows, 1.0)["numeric"]
    assert (m["accuracy"], m["accuracy_within_tolerance"], m["unparseable"]) == (0.25, 0.5, 1)
    assert (m["mae"], m["mae_n"]) == (round((0 + 1 + 4) / 3, 4), 3)  # over the parsed answers
    assert scoring.compute_metrics(rows, 0.0)["numeric"]["accuracy_within_tolerance"] == 0.25


def test_multi_label_metrics_by_hand():
    rows = [row("multi_label", ["A", "C"], ["A", "C"]), row("multi_label", ["A", "C"], ["A"]),
            row("multi_label", ["B"], ["B", "D"]), row("multi_label", ["D"], None)]
    m = scoring.compute_metrics(rows, 1.0)["multi_label"]
    assert (m["accuracy"], m["n"]) == (0.25, 4)
    # tp = 2 + 1 + 1 + 0 = 4, fp = 0 + 0 + 1 + 0 = 1, fn = 0 + 1 + 0 + 1 = 2
    assert (m["micro_precision"], m["micro_recall"], m["micro_f1"]) == (0.8, round(4 / 6, 4), round(8 / 11, 4))


def test_overall_micro_counts_items_across_types():
    rows = [row("single_choice", "A", "A"), row("single_choice", "A", "B"), row("numeric", 2.0, None),
            row("multi_label", ["A", "C"], ["A"])]
    m = scoring.compute_metrics(rows, 1.0)["overall"]
    assert (m["accuracy"], m["n"], m["unparseable"]) == (0.25, 4, 1)
    # tp: 1 + 0 + 0 + 1 = 2; fp: 0 + 1 + 0 + 0 = 1; fn: 0 + 1 + 1 + 1 = 3
    assert (m["precision"], m["recall"]) == (round(2 / 3, 4), 0.4)


def test_all_wrong_and_empty_classes():
    rows = [row("single_choice", "A", "B"), row("single_choice", "B", "A")]
    m = scoring.compute_metrics(rows, 1.0)
    assert m["single_choice"]["accuracy"] == 0.0 and m["single_choice"]["macro_f1"] == 0.0
    assert m["overall"]["accuracy_ci95"][0] == 0.0 and m["overall"]["accuracy_ci95"][1] > 0.5
    assert "numeric" not in m and "multi_label" not in m
    assert scoring.compute_metrics([], 1.0)["overall"]["accuracy"] is None


def test_wilson_interval():
    assert scoring.wilson_interval(0, 0) is None
    lo, hi = scoring.wilson_interval(8, 10)
    assert (lo, hi) == (0.4902, 0.9433)  # textbook value for 8/10
    assert scoring.wilson_interval(10, 10)[1] == 1.0 and scoring.wilson_interval(10, 10)[0] == 0.7225


def test_metrics_table_reads():
    rows = [row("single_choice", "A", "A"), row("numeric", 2.0, 2.0), row("multi_label", ["A"], None)]
    table = scoring.metrics_table(scoring.compute_metrics(rows, 1.0))
    assert table.splitlines()[0].startswith("| questions | n | accuracy (95% CI)")
    assert "| multi_label | 1 | 0.0% (0%–79%)" in table and "unparseable 1" in table
    assert "| overall | 3 | 66.7%" in table


def test_prediction_rows_hold_each_raw_answer_its_parse_and_the_gold(tmp_path, processor_without_model, monkeypatch):
    """evaluate_records with literal answers in place of generation (the tiny model's are blank, so its predictions
    cannot show a parser bug): each row holds the raw text, its parse, the gold answer and the verdict, all written
    out by hand here. The processor only renders the prompts."""
    import json

    from curriculum import evaluation
    from curriculum.data_files import load_records

    questions = [
        ({"id": "sc", "question": "Color?", "type": "single_choice", "options": OPTS, "answer": "C"}, "Answer: C",
         "C", "C", True),
        ({"id": "num", "question": "How many?", "type": "numeric", "answer": "3"}, "3", 3.0, 3.0, True),
        ({"id": "num2", "question": "How many?", "type": "numeric", "answer": 2}, "There are 4.", 4.0, 2.0, False),
        ({"id": "ml", "question": "Colors?", "type": "multi_label", "options": OPTS, "answer": ["D", "A"]}, "d, a",
         ["A", "D"], ["A", "D"], True),
        ({"id": "blank", "question": "Color?", "type": "single_choice", "options": OPTS, "answer": "A"}, "", None,
         "A", False),
    ]
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q, *_ in questions))
    raw = {q["id"]: text for q, text, *_ in questions}
    monkeypatch.setattr(evaluation, "generate_answers", lambda model, processor, records, *args, **kwargs:
                        [raw[r.id] for r in records])
    cfg = types.SimpleNamespace(eval_batch_size=2, max_new_tokens=8, numeric_tolerance=0.0)
    metrics, predictions = evaluation.evaluate_records(None, processor_without_model, load_records(path), cfg)
    assert [(p["id"], p["raw_output"], p["parsed"], p["gold"], p["correct"]) for p in predictions] == [
        (q["id"], text, parsed, gold, correct) for q, text, parsed, gold, correct in questions]
    assert (metrics["overall"]["n"], metrics["overall"]["correct"]) == (5, 3)
    assert metrics["numeric"]["accuracy"] == 0.5 and metrics["single_choice"]["unparseable"] == 1
