"""A damaged stage directory gets a failed check with its reason in one line, never a traceback, and the checks it
does not affect still report; a stage 2 started from a damaged stage stops before the model loads (exit 2).

Each damaged stage is a copy of a healthy stage of the session's curriculum, damaged the way it happens in practice.
"""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_script, stage_args
from test_verify import copy_stage, line_of

from curriculum.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_file_problems
from curriculum.config import LoraSettings
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS


def verify(*args: str) -> tuple[int, str]:
    """Exit code and everything the verifier printed, both streams: a traceback in either is a failure here."""
    result = run_script("verify_exp4_fix.py", *args)
    return result.returncode, result.stdout + result.stderr


def assert_reported_cleanly(code: int, out: str, expected_code: int = 1) -> None:
    assert code == expected_code, out
    assert "Traceback" not in out, out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rank_8_config_on_rank_4_tensors(stage: Path) -> None:
    """A hand-edited (or mixed-up) adapter_config.json: it says r=8, the tensors saved beside it are rank 4."""
    edit_json(stage / ADAPTER_CONFIG, r=8, lora_alpha=16)


def corrupt_header_same_size(stage: Path) -> None:
    """Bytes overwritten inside the safetensors header: the file keeps its size, so a size check would pass."""
    weights = stage / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # the first 8 bytes give the header's length; the JSON header follows
    weights.write_bytes(bytes(data))


def test_rank_8_config_on_rank_4_tensors(curriculum, tmp_path):
    """The issue's case: the model load used to die with a 40-line size-mismatch traceback and no report."""
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "r8")
    rank_8_config_on_rank_4_tensors(stage)
    code, out = verify(str(stage))
    assert_reported_cleanly(code, out)
    assert line_of(out, "adapter shapes") == "✗ adapter shapes: adapter_config.json says r=8, the tensors have rank 4"
    assert "resolved_config.yaml says 4, the saved adapter has 8" in line_of(out, "LoRA config")
    reopened = line_of(out, "reopened for training")  # the load raised inside the check: that check fails alone
    assert reopened.startswith("✗ reopened for training: RuntimeError: Error(s) in loading state_dict")
    assert "size mismatch" in reopened and reopened.endswith("(--debug shows the traceback)")
    for unaffected in ("adapter files", "stage record", "lineage", "continuity", "base model", "trained by"):
        assert line_of(out, unaffected).startswith("✓"), out
    assert "verify: 6 passed, 3 failed, 0 not run" in out

    code, out = verify(str(stage), "--debug")
    assert code == 1 and "Traceback" in out and "in check_reopened_for_training" in out

    code, out = verify(str(stage), "--json")
    report = json.loads(out[out.index("{"):out.rindex("}") + 1])
    by_name = {c["name"]: c for c in report["checks"]}
    assert code == 1 and report["ok"] is False
    assert by_name["adapter shapes"]["detail"] == "adapter_config.json says r=8, the tensors have rank 4"
    assert by_name["reopened for training"]["status"] == "fail" and "size mismatch" in by_name[
        "reopened for training"]["detail"]
    assert by_name["lineage"]["status"] == "pass" and "traceback" not in by_name["reopened for training"]


def test_adapter_config_that_is_not_json(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "not_json")
    (stage / ADAPTER_CONFIG).write_text('{"r": 4, "lora_alpha": 8,')  # cut short by a full disk or an editor
    code, out = verify(str(stage))
    assert_reported_cleanly(code, out)
    assert line_of(out, "adapter files").startswith("✗ adapter files: adapter_config.json is not valid JSON")
    assert line_of(out, "lineage") == "- lineage: not run (the adapter files are broken)"
    for unaffected in ("stage record", "continuity", "base model", "trained by"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_missing_stage_metrics(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "no_metrics")
    (stage / STAGE_METRICS).unlink()
    code, out = verify(str(stage), "--skip-load")
    assert_reported_cleanly(code, out)
    assert line_of(out, "stage record").startswith("✗ stage record: no stage_metrics.json beside resolved_config.yaml")
    assert line_of(out, "lineage").startswith("- lineage: not run (no readable stage_metrics.json")
    assert line_of(out, "trained by").startswith("- trained by: not run (no readable stage_metrics.json")
    for unaffected in ("adapter files", "adapter shapes", "LoRA config"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_stage_metrics_that_is_not_json(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "metrics_not_json")
    (stage / STAGE_METRICS).write_text("{broken")
    code, out = verify(str(stage), "--skip-load")
    assert_reported_cleanly(code, out)  # a damaged stage, no longer bad usage (exit 2) that hides every other check
    assert line_of(out, "stage record").startswith("✗ stage record: stage_metrics.json is not valid JSON")
    assert line_of(out, "trained by").startswith("- trained by: not run (no readable stage_metrics.json")
    for unaffected in ("adapter files", "adapter shapes", "LoRA config"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_stage_metrics_from_another_stage(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "mixed_up")
    shutil.copy(root / "stage1" / STAGE_METRICS, stage / STAGE_METRICS)
    code, out = verify(str(stage), "--skip-load")
    assert_reported_cleanly(code, out)
    assert ("✗ stage record: stage: stage_metrics.json says 1, resolved_config.yaml says 2 (a stage_metrics.json "
            "from another stage?)") == line_of(out, "stage record")
    assert "the adapter on disk is not the one the stage saved" in line_of(out, "lineage")
    for unaffected in ("adapter files", "adapter shapes", "LoRA config", "trained by"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_tensor_file_of_the_right_size_with_a_corrupted_header(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "bad_header")
    size = (stage / ADAPTER_WEIGHTS).stat().st_size
    corrupt_header_same_size(stage)
    assert (stage / ADAPTER_WEIGHTS).stat().st_size == size
    code, out = verify(str(stage))
    assert_reported_cleanly(code, out)
    assert line_of(out, "adapter files").startswith("✗ adapter files: adapter_model.safetensors is unreadable "
                                                    "(truncated or corrupt?): Error while deserializing header")
    for unaffected in ("stage record", "continuity", "base model", "trained by"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_two_adapters_leave_the_other_checks_reported(curriculum, tmp_path):
    root, _ = curriculum
    two = copy_stage(root / "stage2", tmp_path / "two")
    copy_stage(root / "stage1", two / "second")  # where peft saves a second adapter named "second"
    code, out = verify(str(two))
    assert_reported_cleanly(code, out)
    assert "more than one adapter (also: second)" in line_of(out, "adapter files")
    for unaffected in ("stage record", "continuity", "base model", "trained by"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_base_model_path_that_no_longer_exists(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "moved_base")
    gone = str(tmp_path / "deleted-base-model")
    (stage / RESOLVED_CONFIG).write_text((stage / RESOLVED_CONFIG).read_text().replace("tiny-qwen3vl", gone))
    edit_json(stage / STAGE_METRICS, model_name_or_path=gone)
    code, out = verify(str(stage))
    assert_reported_cleanly(code, out)
    assert line_of(out, "base model") == (f"✗ base model: the stage trained on {gone}, which no longer exists "
                                          "(moved? pass --base with where it is now)")
    assert line_of(out, "reopened for training").startswith("- reopened for training: not run (base ")
    for unaffected in ("adapter files", "adapter shapes", "stage record", "lineage", "continuity"):
        assert line_of(out, unaffected).startswith("✓"), out


def test_a_check_that_raises_fails_alone(curriculum, tmp_path):
    """Damage that no check foresees (here a loss recorded as text) fails the check that met it, in one line."""
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "odd_metrics")
    edit_json(stage / STAGE_METRICS, first_eval_loss="9.3")
    code, out = verify(str(stage), "--skip-load")
    assert_reported_cleanly(code, out)
    assert line_of(out, "continuity").startswith("✗ continuity: TypeError: ")
    assert line_of(out, "continuity").endswith("(--debug shows the traceback)")
    for unaffected in ("adapter files", "adapter shapes", "stage record", "lineage", "base model"):
        assert line_of(out, unaffected).startswith("✓"), out
    code, out = verify(str(stage), "--skip-load", "--json", "--debug")
    continuity = next(c for c in json.loads(out[out.index("{"):])["checks"] if c["name"] == "continuity")
    assert code == 1 and continuity["status"] == "fail" and "in check_continuity" in continuity["traceback"]


def test_curriculum_with_damaged_stages_among_good_ones(curriculum, tmp_path):
    root, _ = curriculum
    copies = tmp_path / "curriculum"
    stages = [copy_stage(root / f"stage{s}", copies / f"stage{s}") for s in (1, 2, 3)]
    rank_8_config_on_rank_4_tensors(stages[1])
    (stages[2] / STAGE_METRICS).write_text("{broken")  # still listed, in its place, from its resolved config
    code, out = verify("--curriculum", str(copies), "--skip-load")
    assert_reported_cleanly(code, out)
    blocks = out.split("== ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [str(s) for s in stages], out
    assert "✗" not in blocks[0], blocks[0]
    assert "✗ adapter shapes: adapter_config.json says r=8, the tensors have rank 4" in blocks[1]
    assert "✗ stage record: stage_metrics.json is not valid JSON" in blocks[2]
    assert "✓ adapter files" in blocks[2] and "✓ continuity" in blocks[1]
    assert line_of(out, "LoRA config across stages").startswith("✗")  # stage 2's adapter_config.json now says r=8


def test_adapter_file_problems_name_targets_that_differ(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage1", tmp_path / "targets")
    assert adapter_file_problems(stage, LoraSettings(), RESOLVED_CONFIG) == []
    edit_json(stage / ADAPTER_CONFIG, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    assert adapter_file_problems(stage, LoraSettings(r=8, target_modules=["q_proj"]), RESOLVED_CONFIG) == [
        "adapter_config.json targets gate_proj,k_proj,o_proj,q_proj,v_proj, the tensors adapt "
        "k_proj,o_proj,q_proj,v_proj",
        "resolved_config.yaml says lora.r=8, the tensors have rank 4",
        "resolved_config.yaml says lora.target_modules=q_proj, the tensors adapt k_proj,o_proj,q_proj,v_proj"]


# ---------------------------------------------------------------------------------------------------------------------
# The trainer refuses a damaged prev_checkpoint before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def not_json(stage: Path) -> None:
    (stage / ADAPTER_CONFIG).write_text('{"r": 4,')


@pytest.mark.parametrize("damage, overrides, reason", [
    # The stage 2 YAML agrees with the edited config (r=8), so only the tensors tell: the load used to raise.
    (rank_8_config_on_rank_4_tensors, ["--set", "lora.r=8", "--set", "lora.alpha=16"],
     "adapter_config.json says r=8, the tensors have rank 4"),
    (not_json, [], "adapter_config.json is not valid JSON"),
    (corrupt_header_same_size, [], "adapter_model.safetensors is unreadable (truncated or corrupt?)"),
])
def test_stage_2_from_a_damaged_stage_stops_before_the_model_loads(curriculum, tmp_path, damage, overrides, reason):
    root, _ = curriculum
    prev = copy_stage(root / "stage1", tmp_path / "damaged_stage1")
    damage(prev)
    result = run_script("train_qlora_qwen3vl.py", *stage_args(2, tmp_path, "stage2", "damaged_stage1"), *overrides)
    out = result.stdout + result.stderr
    assert_reported_cleanly(result.returncode, out, expected_code=2)
    assert f"prev_checkpoint: {prev}: {reason}" in result.stderr, out
    assert "(the keys set; every key" not in out and not (tmp_path / "stage2.partial").exists()  # stopped at validation
