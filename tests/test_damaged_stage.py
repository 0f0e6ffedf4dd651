"""A stage 2 started from a damaged stage stops before the model loads (exit 2), naming the file and the mismatch.

Each damaged stage is a copy of a healthy stage of the session's curriculum, damaged the way it happens in practice.
"""

import json
from pathlib import Path

import pytest
from conftest import run_script, stage_args
from test_verify import copy_stage

import train_qlora_qwen3vl as tq


def assert_reported_cleanly(code: int, out: str, expected_code: int = 1) -> None:
    assert code == expected_code, out
    assert "Traceback" not in out, out


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def rank_8_config_on_rank_4_tensors(stage: Path) -> None:
    """A hand-edited (or mixed-up) adapter_config.json: it says r=8, the tensors saved beside it are rank 4."""
    edit_json(stage / tq.ADAPTER_CONFIG, r=8, lora_alpha=16)


def corrupt_header_same_size(stage: Path) -> None:
    """Bytes overwritten inside the safetensors header: the file keeps its size, so a size check would pass."""
    weights = stage / tq.ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # the first 8 bytes give the header's length; the JSON header follows
    weights.write_bytes(bytes(data))


def test_adapter_file_problems_name_targets_that_differ(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage1", tmp_path / "targets")
    assert tq.adapter_file_problems(stage, tq.LoraSettings(), tq.RESOLVED_CONFIG) == []
    edit_json(stage / tq.ADAPTER_CONFIG, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    assert tq.adapter_file_problems(stage, tq.LoraSettings(r=8, target_modules=["q_proj"]), tq.RESOLVED_CONFIG) == [
        "adapter_config.json targets gate_proj,k_proj,o_proj,q_proj,v_proj, the tensors adapt "
        "k_proj,o_proj,q_proj,v_proj",
        "resolved_config.yaml says lora.r=8, the tensors have rank 4",
        "resolved_config.yaml says lora.target_modules=q_proj, the tensors adapt k_proj,o_proj,q_proj,v_proj"]


# ---------------------------------------------------------------------------------------------------------------------
# The trainer refuses a damaged prev_checkpoint before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def not_json(stage: Path) -> None:
    (stage / tq.ADAPTER_CONFIG).write_text('{"r": 4,')


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
    assert "Resolved config" not in out and not (tmp_path / "stage2.partial").exists()  # stopped at validation
