"""A stage folder stands on its own: it names its base as the user did, describes itself in a model card of
ours, and still verifies and continues after it has been moved."""

import json
import os
import re
import shutil

from conftest import REPO, assert_continued, metrics, run_script, run_stage, stage_args

from curriculum.adapter_files import ADAPTER_CONFIG
from curriculum.hashing import sha256_file
from curriculum.lineage import previous_stage_dir


def test_adapter_config_names_the_base_as_the_config_does(curriculum):
    root, _ = curriculum
    for stage in (1, 2, 3):
        saved = json.loads((root / f"stage{stage}" / ADAPTER_CONFIG).read_text())
        # not the local directory the name was resolved to (models/tiny-qwen3vl, absolute), which peft records
        assert saved["base_model_name_or_path"] == "tiny-qwen3vl"


def test_model_card_describes_the_stage(curriculum):
    root, _ = curriculum
    card = (root / "stage2" / "README.md").read_text()
    m = metrics(root / "stage2")
    assert "[More Information Needed]" not in card  # peft's empty template is gone
    assert card.startswith("---\nbase_model: tiny-qwen3vl\nlibrary_name: peft\n")
    assert "# Stage 2: a LoRA adapter for `tiny-qwen3vl`" in card
    for split in ("train", "dev"):  # the data, by content
        path = f"data/stage2/{split}.jsonl"
        assert re.search(rf"\| `{re.escape(path)}` \| `{sha256_file(REPO / path)}` \|", card), split
    assert f"`{root / 'stage1'}`" in card  # lineage: what it continued, and the hashes of start and end
    assert m["start_adapter_file_sha256"] in card and m["saved_adapter_file_sha256"] in card
    assert metrics(root / "stage1")["saved_adapter_file_sha256"] == m["start_adapter_file_sha256"]
    for key in ("first_eval_loss", "previous_final_eval_loss", "final_eval_loss", "train_loss"):
        assert f"| {m[key]:.4f} |" in card, key
    for kind in ("single_choice", "numeric", "multi_label", "overall"):  # dev accuracy by question type
        assert f"| {kind} | {m['dev_metrics'][kind]['n']} | {m['dev_metrics'][kind]['accuracy']:.1%}" in card
    first = (root / "stage1" / "README.md").read_text()
    assert "A new adapter (B = 0 at the start" in first and "previous stage's final_eval_loss" not in first
    assert m["data_files"]["train_file"] == {"path": "data/stage2/train.jsonl",
                                             "sha256": sha256_file(REPO / "data/stage2/train.jsonl")}


def test_a_moved_stage_continues_and_verifies(curriculum, tmp_path):
    """Stage 1, copied elsewhere, is continued by a stage 2 that names its base by a relative path; then both are
    moved together to another folder (the old one deleted) and verified there, lineage and reload included."""
    root, _ = curriculum
    before = tmp_path / "before"
    shutil.copytree(root / "stage1", before / "stage1")
    run_stage(*stage_args(2, before), "--set", "max_steps=3", "--set", "eval_questions=0",
              "--set", "tensorboard=false", "--set", "model_name_or_path=models/tiny-qwen3vl")
    assert_continued(before / "stage1", before / "stage2")
    saved = json.loads((before / "stage2" / ADAPTER_CONFIG).read_text())
    assert saved["base_model_name_or_path"] == "models/tiny-qwen3vl"  # relative, as given (run from the repo)

    after = tmp_path / "after"
    os.rename(before, after)  # the recorded prev_checkpoint (before/stage1) no longer exists
    assert metrics(after / "stage2")["prev_checkpoint"].endswith("before/stage1") and not before.exists()
    result = run_script("verify_exp4_fix.py", "--curriculum", str(after))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"✓ lineage: started from exactly {after / 'stage1'}'s adapter" in result.stdout
    assert "✓ continuity: first_eval_loss" in result.stdout  # against the moved stage 1's own final_eval_loss
    assert result.stdout.count("✓ reopened for training") == 2 and "✗" not in result.stdout
    # the recorded path if it holds a stage, else the folder of that name beside, else none
    assert previous_stage_dir(after / "stage2", str(before / "stage1")) == after / "stage1"
    assert previous_stage_dir(after / "stage2", str(tmp_path / "elsewhere" / "gone")) is None
