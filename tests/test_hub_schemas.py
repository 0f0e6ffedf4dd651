"""Datasets as the Hub serves them, trained and evaluated end to end: a plain table (image, question, answer; no
`columns:`), then ScienceQA, ChartQA, VQAv2 and DocVQA in their cards' schemas through `columns:` alone, one demo stage
each, chained as a curriculum: stages 2 and 3 watch the earlier ones' dev splits (each read with its own stage's
columns), stage 2 replays stage 1's table, and the verifier, vqa_eval --data and --forgetting run on the chain.

Slow (a module of conftest.SLOW_MODULES): five short stages of the tiny model. Kept cheap: 6 training rows and 3 dev
rows of 64x64 images per split, 2 steps a stage, 2 dev questions answered in up to 4 tokens, no watch in stages 4
and 5 (stage 3's already reads two other layouts), the forgetting matrix over stages 1 and 2 only, one fixture for
every test.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "tests" / "hub_schemas"))
from make_hub_schemas import COLUMNS  # noqa: E402

HUB = Path("tests/hub_schemas")  # relative, as a user writes it in a config
ORDER = ["plain", "scienceqa", "chartqa", "vqav2", "docvqa"]  # stage 1 .. 5
QUESTIONS = 2  # dev questions answered by generation, per split


def flow(columns: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in columns.items()) + "}"


def stage_command(stage: int, root: Path) -> list[str]:
    name = ORDER[stage - 1]
    args = [f"configs/demo/stage{min(stage, 3)}.yaml", "--set", f"stage={stage}",
            "--set", f"output_dir={root / f'stage{stage}'}",
            "--set", f"train_file={HUB / name / 'train.parquet'}", "--set", f"eval_file={HUB / name / 'dev.parquet'}",
            "--set", "max_steps=2", "--set", "batch_size=2", "--set", f"eval_questions={QUESTIONS}",
            "--set", "max_new_tokens=4",  # a short answer is all the scores need; generation is most of the cost
            "--set", "tensorboard=false", "--set", "dataloader_num_workers=0"]
    if COLUMNS[name]:  # the plain table gets no columns: block at all
        args += ["--set", f"columns={flow(COLUMNS[name])}"]
    if stage > 1:
        args += ["--set", f"prev_checkpoint={root / f'stage{stage - 1}'}"]
    if stage == 2:  # replay the plain table, read as stage 1 read it
        args += ["--set", "replay.fraction=0.5"]
    if stage >= 4:
        args += ["--set", "watch_earlier_stages=false"]
    return args


@pytest.fixture(scope="module")
def hub_curriculum(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("hub")
    logs = {}
    for stage in range(1, len(ORDER) + 1):
        result = run_script("train_qlora_qwen3vl.py", *stage_command(stage, root))
        assert result.returncode == 0, f"stage {stage} ({ORDER[stage - 1]}):\n" + result.stdout[-3000:] + \
            result.stderr[-3000:]
        logs[stage] = result.stdout
    return root, logs


def stage_metrics(root: Path, stage: int) -> dict:
    return json.loads((root / f"stage{stage}" / "stage_metrics.json").read_text())


def test_a_plain_table_trains_with_free_text_and_inferred_types(hub_curriculum):
    root, logs = hub_curriculum
    assert "columns" not in " ".join(stage_command(1, root))
    log = logs[1]
    assert "train: 6 samples (4 free_text, 2 numeric)" in log
    assert ("train types: 6 of 6 inferred per row, with no type in column 'type' (columns.type): 4 free_text, "
            "2 numeric. To fix one type for the whole split instead, set question_type (e.g. question_type: "
            "free_text)") in log
    dev = stage_metrics(root, 1)["dev_metrics"]
    assert dev["free_text"]["n"] + dev.get("numeric", {}).get("n", 0) == QUESTIONS
    assert {"exact_match", "token_f1", "anls", "anls_ci95", "relaxed_accuracy",
            "vqa_accuracy_n"} <= set(dev["free_text"])
    assert "| free_text | " in log  # the stage's printed table
    predictions = [json.loads(line) for line in (root / "stage1" / "predictions_dev.jsonl").read_text().splitlines()]
    assert predictions[0]["id"] == f"{HUB / 'plain' / 'dev.parquet'}:row 0" and predictions[0]["gold"] == ["red"]
    assert "Answer the question using a single word or phrase." in predictions[0]["prompt"]


@pytest.mark.parametrize("stage, kind", [(2, "single_choice"), (3, "free_text"), (4, "free_text"),
                                         (5, "free_text")])
def test_each_public_schema_trains_and_evaluates_through_columns_alone(hub_curriculum, stage, kind):
    root, logs = hub_curriculum
    m = stage_metrics(root, stage)
    assert m["global_steps"] == 2 and m["saved_adapter_tensors_sha256"] != m["start_adapter_tensors_sha256"]
    assert set(m["dev_metrics"]) == {kind, "overall"} and m["dev_metrics"][kind]["n"] == QUESTIONS
    if stage == 4:  # VQAv2: ten human answers a question, so VQA accuracy is reported
        assert m["dev_metrics"]["free_text"]["vqa_accuracy_n"] == QUESTIONS
        gold = json.loads((root / "stage4" / "predictions_dev.jsonl").read_text().splitlines()[0])["gold"]
        assert len(gold) == 10
    # every earlier stage's dev split watched and answered, each read with its own stage's columns
    earlier = m["earlier_stages"]
    assert [e["stage"] for e in earlier] == (list(range(1, stage)) if stage <= 3 else [])
    assert all(e["loss_at_start"] and e["final_loss"] and e["dev_metrics"]["overall"]["n"] == QUESTIONS
               for e in earlier)
    assert (f"Dev accuracy on stage 1's dev split ({QUESTIONS} questions, by generation)" in logs[stage]) == \
        (stage <= 3)


def test_replay_of_the_plain_table_and_the_verifier_over_the_chain(hub_curriculum):
    root, _ = hub_curriculum
    replay = stage_metrics(root, 2)["replay"]
    assert replay["stages"] == [1] and replay["sources"][0]["train_file"] == str(HUB / "plain" / "train.parquet")
    assert replay["sources"][0]["ids"][0].startswith(f"{HUB / 'plain' / 'train.parquet'}:row ")
    result = run_script("verify_exp4_fix.py", "--curriculum", str(root), "--skip-load")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "✓ replay" in result.stdout and " 0 failed" in result.stdout


def test_vqa_eval_scores_a_plain_table_with_the_free_text_metrics(hub_curriculum, tmp_path):
    root, _ = hub_curriculum
    data = HUB / "plain" / "dev.parquet"
    result = run_script("vqa_eval.py", str(root / "stage1" / "resolved_config.yaml"), "--data", str(data),
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| free_text | 2 | " in result.stdout and "ANLS" in result.stdout
    metrics = json.loads((tmp_path / "metrics_dev_adapter.json").read_text())["metrics"]
    assert metrics["free_text"]["n"] == 2 and metrics["numeric"]["n"] == 1 and metrics["overall"]["n"] == 3
    assert {"exact_match", "token_f1", "anls", "token_f1_ci95", "anls_ci95"} <= set(metrics["free_text"])


def test_the_forgetting_matrix_reads_each_split_as_its_stage_did(hub_curriculum, tmp_path):
    root, _ = hub_curriculum
    # the plain table and ScienceQA: read with stage 1's columns, ScienceQA's answer index would read as a number
    for stage in (1, 2):
        (tmp_path / f"stage{stage}").symlink_to(root / f"stage{stage}")
    result = run_script("vqa_eval.py", "--forgetting", str(tmp_path), "--limit", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    matrix = json.loads((tmp_path / "forgetting_matrix.json").read_text())
    assert matrix["evaluated"] == [1, 2] and set(matrix["by_type"]["2"]["2"]) == {"single_choice"}
    assert set(matrix["by_type"]["base"]["1"]) == {"free_text"}  # the first row of the plain table
    table = (tmp_path / "forgetting_matrix.md").read_text()
    assert "free_text (exact match, 95% interval):" in table and "single_choice (accuracy, 95% interval):" in table
