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


# ---------------------------------------------------------------------------------------------------------------------
# Free text: the VQA literature's normalisation and scores, on hand-computed cases
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("None", "0"), ("  Yes!\n", "yes"),       # case, number words (none is 0 too), punctuation
    ("the red car.", "red car"), ("an apple", "apple"),   # articles; a period not before a digit
    ("red/green", "red green"), ("red, green", "red green"),  # joining punctuation -> space; ", " -> removed
    ("1,000", "1000"), ("2.5", "2.5"), ("5.", "5"),         # a comma between digits, a decimal point kept
    ("dont", "don't"), ("were", "were"), ("(a) dog", "dog"),
])
def test_vqa_normalisation_as_the_official_script(text, expected):
    assert scoring.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("blue", "blue"), ("Answer: blue", "blue"), ("The answer is red car.\nbecause", "red car."),
    ("answer key", "answer key"), ("", None), ("  \n", None),
])
def test_parse_free_text(text, expected):
    assert scoring.parse_answer(text, "free_text", None) == expected


def test_exact_match_against_any_reference_after_normalisation():
    assert scoring.exact_match("Two", ["2"]) == 1.0
    assert scoring.exact_match("blue", ["red", "Blue."]) == 1.0
    assert scoring.exact_match("a dog", ["cat", "dogs"]) == 0.0
    assert scoring.exact_match(None, ["x"]) == 0.0


def test_token_f1_is_squads_over_normalised_words_best_reference():
    assert scoring.token_f1("red car", ["the red truck"]) == 0.5  # 1 common word: P = R = 1/2
    assert scoring.token_f1("red car", ["blue", "a red car!"]) == 1.0
    assert scoring.token_f1("big red car", ["red car"]) == pytest.approx(0.8)  # P 2/3, R 1
    assert scoring.token_f1("red red", ["red red car"]) == pytest.approx(0.8)  # words counted: 2 common, P 1, R 2/3
    assert scoring.token_f1(None, ["red"]) == 0.0 and scoring.token_f1("red", ["blue"]) == 0.0


def test_levenshtein_and_anls_with_threshold():
    assert scoring.levenshtein("kitten", "sitting") == 3 and scoring.levenshtein("", "abc") == 3
    assert scoring.anls("Hello", ["hello"]) == 1.0                   # case and spacing only, as DocVQA's
    assert scoring.anls("helo", ["hello"]) == pytest.approx(0.8)     # 1 edit / 5 characters
    assert scoring.anls("helo", ["xyz", "hello"]) == pytest.approx(0.8)  # the best reference
    assert scoring.anls("abcx", ["abcd"]) == 0.75
    assert scoring.anls("abxy", ["abcd"]) == 0.0                     # NL = 0.5 is not < 0.5: a different answer
    assert scoring.anls("two", ["2"]) == 0.0                          # characters, not number words
    assert scoring.anls(None, ["a"]) == 0.0


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    refs = ["2"] * 3 + ["3"] * 7
    # leaving out one of the three "2"s leaves 2 matches (2/3), leaving out a "3" leaves 3 (1): (3 * 2/3 + 7) / 10
    assert scoring.vqa_accuracy("two", refs) == pytest.approx(0.9)
    assert scoring.vqa_accuracy("3", refs) == 1.0 and scoring.vqa_accuracy("4", refs) == 0.0
    # one matching human: 9 subsets hold it (1/3 each), one does not: 0.3, not min(1/3, 1)
    assert scoring.vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
    assert scoring.vqa_accuracy("yes", ["yes"] * 9) is None and scoring.vqa_accuracy(None, refs) == 0.0


def test_relaxed_accuracy_as_chartqa_scores_it():
    assert scoring.relaxed_accuracy("12.4", ["12"]) == 1.0           # 3.3% off: within 5%
    assert scoring.relaxed_accuracy("12.7", ["12"]) == 0.0           # 5.8% off
    assert scoring.relaxed_accuracy("10.5", ["10"]) == 1.0           # exactly 5%: within
    assert scoring.relaxed_accuracy("-10.5", ["-10"]) == 1.0         # relative to the reference's size
    assert scoring.relaxed_accuracy("40%", ["0.4"]) == 1.0           # a percentage is its fraction
    assert scoring.relaxed_accuracy("0.41", ["40%"]) == 1.0
    assert scoring.relaxed_accuracy("41", ["40%"]) == 0.0            # 41 is not 0.41
    assert scoring.relaxed_accuracy("0", ["0"]) == 1.0               # a reference of 0: compared as text
    assert scoring.relaxed_accuracy("0.0", ["0"]) == 0.0
    assert scoring.relaxed_accuracy(" Yes", ["yes"]) == 1.0          # text: case and outer spaces aside
    assert scoring.relaxed_accuracy("yes.", ["yes"]) == 0.0          # but nothing more
    assert scoring.relaxed_accuracy("two", ["2"]) == 0.0             # no number words, as ChartQA's evaluation
    assert scoring.relaxed_accuracy("5", ["blue", "5.1"]) == 1.0     # the best reference
    assert scoring.relaxed_accuracy(None, ["5"]) == 0.0


def test_free_text_metrics_by_hand():
    rows = [row("free_text", ["blue"], "Blue"),                     # EM 1, F1 1, ANLS 1
            row("free_text", ["red car"], "red cars"),              # EM 0, F1 1/2, ANLS 1 - 1/8
            row("free_text", ["2"] * 3 + ["3"] * 7, "two"),         # EM 1, F1 1, ANLS 0, VQA accuracy 0.9
            row("free_text", ["yes"], None)]                        # unparseable: 0 everywhere
    m = scoring.compute_metrics(rows, 1.0)
    free = m["free_text"]
    assert (free["accuracy"], free["exact_match"], free["n"], free["correct"]) == (0.5, 0.5, 4, 2)
    assert free["unparseable"] == 1
    assert free["accuracy_ci95"] == scoring.wilson_interval(2, 4)
    assert free["token_f1"] == 0.625 and free["token_f1_ci95"] == scoring.wilson_interval(2.5, 4)
    assert free["anls"] == round((1 + 0.875) / 4, 4) and free["anls_ci95"] == scoring.wilson_interval(1.875, 4)
    assert (free["vqa_accuracy"], free["vqa_accuracy_n"]) == (0.9, 1)
    # relaxed accuracy: "Blue" is "blue" (case); "red cars" is not "red car"; "two" is not 2 (no number words)
    assert free["relaxed_accuracy"] == 0.25 and free["relaxed_accuracy_ci95"] == scoring.wilson_interval(1, 4)
    # overall: one item per free-text question: 2 right (tp), 1 wrong answer (fp and fn), 1 unparseable (fn)
    assert (m["overall"]["accuracy"], m["overall"]["precision"], m["overall"]["recall"]) == (0.5, round(2 / 3, 4), 0.5)
    assert scoring.is_correct("Two", ["2"], "free_text") and not scoring.is_correct(None, ["2"], "free_text")


def test_wilson_interval_of_a_mean_score_covers_it():
    lo, hi = scoring.wilson_interval(2.5, 4)
    assert lo < 0.625 < hi and scoring.wilson_interval(0.0, 3)[0] == 0.0


def test_metrics_table_has_a_free_text_row():
    rows = [row("free_text", ["blue"], "blue"), row("free_text", ["2"] * 3 + ["3"] * 7, "two"),
            row("numeric", 2.0, 2.0)]
    table = scoring.metrics_table(scoring.compute_metrics(rows, 1.0))
    line = next(x for x in table.splitlines() if x.startswith("| free_text |"))
    assert line.startswith("| free_text | 2 | 100.0% (34%–100%) | – | – | 1.000 | exact match; token F1; ANLS 0.500; "
                           "relaxed accuracy 50.0%; VQA accuracy 90.0% (n=1); unparseable 0 |")
    # a stage's metrics saved before relaxed accuracy was computed still make a table
    metrics = scoring.compute_metrics(rows, 1.0)
    del metrics["free_text"]["relaxed_accuracy"]
    assert "ANLS 0.500; VQA accuracy 90.0% (n=1)" in scoring.metrics_table(metrics)
    assert table.index("| numeric |") < table.index("| free_text |") < table.index("| overall |")
