"""verify_exp4_fix.py against a healthy curriculum and against each known way a curriculum silently breaks."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, metrics, run_script, stage_args

import verify_exp4_fix as vf
from curriculum import recipe_check
from curriculum.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_tensors_sha256,
    file_adapter_sha256,
)
from curriculum.config import LoraSettings
from curriculum.hashing import sha256_file
from curriculum.lineage import saved_stage_lineage
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS


def verify(*args: str):
    """Exit code and the report (stdout); on bad usage (2) the error message, which goes to stderr."""
    result = run_script("verify_exp4_fix.py", *args)
    return result.returncode, result.stdout + (result.stderr if result.returncode == 2 else "")


def line_of(output: str, check: str) -> str:
    lines = [ln for ln in output.splitlines() if ln[2:].startswith(check + ":")]
    assert lines, f"no line for {check!r} in:\n{output}"
    return lines[-1]


def copy_stage(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_healthy_curriculum_passes(curriculum):
    root, _ = curriculum
    code, out = verify("--curriculum", str(root))
    assert code == 0, out
    assert out.count("✓ continuity: first_eval_loss") == 2 and out.count("✓ lineage") == 3
    assert out.count("✓ reopened for training: one adapter 'default', active; 7,168 trainable") == 3
    assert "✓ LoRA config across stages: identical in all 3 stages" in out
    assert out.count("✓ trained by: ") == 3 and out.count(" is that file, curriculum/ the same") == 3
    assert "✗" not in out and out.rstrip().endswith("0 failed, 1 not run")  # stage 1 has no continuity


def test_json_report(curriculum):
    root, _ = curriculum
    code, out = verify(str(root / "stage2"), "--json", "--skip-load")
    report = json.loads(out[out.index("{"):])
    assert code == 0 and report["ok"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["lineage"] == "pass" and statuses["reopened for training"] == "not run"


def test_fresh_adapter_in_stage2_is_rejected(curriculum, tmp_path):
    root, _ = curriculum
    result = run_script("tests/broken_variants.py", "fresh", *stage_args(2, root, str(tmp_path / "fresh")),
                        "--set", "eval_questions=0")
    assert result.returncode == 0, result.stderr[-2000:]
    code, out = verify(str(tmp_path / "fresh"), "--skip-load")
    assert code == 1
    assert "not the previous stage's adapter" in line_of(out, "lineage")
    assert "the stage restarted instead of continuing" in line_of(out, "continuity")
    assert f"run as {REPO / 'tests' / 'broken_variants.py'}, which imported it" in line_of(out, "trained by")


def test_frozen_reload_is_rejected(curriculum, tmp_path):
    """A stage 2 reloaded with is_trainable=False (and gradient checkpointing, so that it does not crash) trains
    nothing and saves the very weights it loaded; its continuity looks perfect."""
    root, _ = curriculum
    result = run_script("tests/broken_variants.py", "frozen", *stage_args(2, root, str(tmp_path / "frozen")),
                        "--set", "gradient_checkpointing=true", "--set", "eval_questions=0")
    assert result.returncode == 0, result.stderr[-2000:]
    code, out = verify(str(tmp_path / "frozen"), "--skip-load")
    assert code == 1 and "it did not train (frozen" in line_of(out, "lineage")
    assert line_of(out, "continuity").startswith("✓")


def test_two_adapters_are_rejected(curriculum, tmp_path):
    root, _ = curriculum
    two = copy_stage(root / "stage2", tmp_path / "two")
    copy_stage(root / "stage1", two / "second")  # where peft saves a second adapter named "second"
    code, out = verify(str(two), "--skip-load")
    assert code == 1 and "more than one adapter (also: second)" in line_of(out, "adapter files")


def test_rank_8_against_a_rank_4_config_is_rejected(curriculum, tmp_path):
    root, _ = curriculum
    out_dir = tmp_path / "r8"
    result = run_script("train_qlora_qwen3vl.py", "configs/demo/stage1.yaml", "--set", f"output_dir={out_dir}",
                        "--set", "max_steps=2", "--set", "lora.r=8", "--set", "lora.alpha=16")
    assert result.returncode == 0, result.stderr[-2000:]
    code, out = verify(str(out_dir), "--config", "configs/demo/stage1.yaml")
    assert code == 1
    line = line_of(out, "LoRA config")
    assert "lora.r: configs/demo/stage1.yaml says 4, the saved adapter has 8" in line
    assert "lora.alpha: configs/demo/stage1.yaml says 8, the saved adapter has 16" in line
    assert line_of(out, "reopened for training").startswith("✗")  # r=4 expected: 7,168 != 14,336
    code, out = verify(str(out_dir))  # against its own recorded config it is a healthy r=8 stage
    assert code == 0, out


def test_merged_model_instead_of_adapter_is_rejected(tiny_model_path, tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(Path(tiny_model_path) / "model.safetensors", merged)
    shutil.copy(Path(tiny_model_path) / "config.json", merged)
    code, out = verify(str(merged))
    assert code == 1 and "it holds a full model: merged instead of saved as an adapter?" in out
    # and merged weights saved under the adapter's file name are caught by their tensor names
    fake = copy_stage(merged, tmp_path / "fake_adapter")
    (fake / "model.safetensors").rename(fake / ADAPTER_WEIGHTS)
    (fake / ADAPTER_CONFIG).write_text("{}")
    code, out = verify(str(fake))
    assert code == 1 and "non-LoRA tensors" in line_of(out, "adapter files")


def test_truncated_safetensors_is_rejected(curriculum, tmp_path):
    root, _ = curriculum
    cut = copy_stage(root / "stage2", tmp_path / "cut")
    data = (cut / ADAPTER_WEIGHTS).read_bytes()
    (cut / ADAPTER_WEIGHTS).write_bytes(data[:len(data) // 2])
    code, out = verify(str(cut))
    assert code == 1 and "unreadable (truncated or corrupt?)" in line_of(out, "adapter files")
    assert "- lineage: not run (the adapter files are broken)" in out


def test_pickled_weights_are_refused_not_loaded(curriculum, tmp_path):
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "pickle")
    (stage / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    code, out = verify(str(stage), "--skip-load")
    assert code == 1 and "pickled files refused, not loaded: adapter_model.bin" in out


def test_continuity_jump_is_reported_with_both_numbers(curriculum, tmp_path):
    root, _ = curriculum
    jump = copy_stage(root / "stage2", tmp_path / "jump")
    m = metrics(jump)
    prev_final = metrics(root / "stage1")["final_eval_loss"]
    m["first_eval_loss"] = prev_final * 1.5
    (jump / STAGE_METRICS).write_text(json.dumps(m))
    code, out = verify(str(jump), "--skip-load")
    assert code == 1
    assert f"first_eval_loss {prev_final * 1.5:.4f} vs previous final_eval_loss {prev_final:.4f} (50.0%" in out
    code, out = verify(str(jump), "--skip-load", "--tolerance", "0.6")
    assert code == 0, out


def test_base_model_mismatch_is_reported(curriculum, tmp_path):
    root, _ = curriculum
    (tmp_path / "fp4.yaml").write_text((REPO / "configs/demo/stage2.yaml").read_text()
                                       .replace("quant_type: nf4", "quant_type: fp4"))
    code, out = verify(str(root / "stage2"), "--config", str(tmp_path / "fp4.yaml"), "--skip-load")
    assert code == 1 and "quantization.quant_type: the config says 'fp4', the stage recorded 'nf4'" in out
    code, out = verify(str(root / "stage2"), "--base", "Qwen/Qwen3-VL-8B-Instruct", "--skip-load")
    assert code == 1 and "--base Qwen/Qwen3-VL-8B-Instruct but the stage trained on tiny-qwen3vl" in out


def test_unloadable_base_is_not_run_never_passed(curriculum, tmp_path):
    """A hub id that cannot be loaded here (offline, or no GPU for an 8B) is not run; a local path that is gone is a
    failed check (tests/test_damaged_stage.py)."""
    root, _ = curriculum
    stage = copy_stage(root / "stage2", tmp_path / "elsewhere")
    cfg_text = (stage / RESOLVED_CONFIG).read_text().replace("tiny-qwen3vl", "no-such-org/no-such-model")
    (stage / RESOLVED_CONFIG).write_text(cfg_text)
    m = metrics(stage)
    m["model_name_or_path"] = "no-such-org/no-such-model"
    (stage / STAGE_METRICS).write_text(json.dumps(m))
    result = run_script("verify_exp4_fix.py", str(stage), env_extra={"HF_HUB_OFFLINE": "1"})
    code, out = result.returncode, result.stdout
    assert code == 0 and "- reopened for training: not run (base " in out and "could not be loaded here" in out
    assert "1 not run" in out


# ---------------------------------------------------------------------------------------------------------------------
# The checks on stage folders written by hand: pure functions over files, in the fast tier (the slow tests above
# run the same checks on stages the tiny model trained)
# ---------------------------------------------------------------------------------------------------------------------

ADAPTED = "base_model.model.model.language_model.layers.0.self_attn.q_proj"


def lora_tensors(seed: int, b_scale: float = 1.0) -> dict:
    """One adapted module's LoRA pair (r=4, 8 wide), seeded; b_scale=0 is an untrained adapter (B starts at zero)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {f"{ADAPTED}.lora_A.weight": torch.randn(4, 8, generator=g),
            f"{ADAPTED}.lora_B.weight": b_scale * torch.randn(8, 4, generator=g)}


def save_adapter_tensors(tensors: dict, stage_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(stage_dir / ADAPTER_WEIGHTS))


def written_stage(path: Path, stage: int, tensors: dict, prev: Path | None = None, **recorded) -> Path:
    """A stage folder as the trainer leaves one: its adapter (`tensors`) and a stage_metrics.json with the hashes the
    trainer records: the adapter saved and, for a stage >= 2, the previous stage's adapter as the one it started
    from (file and weights). `recorded` overrides or adds entries."""
    path.mkdir(parents=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
                                                   "target_modules": ["q_proj"]}))
    save_adapter_tensors(tensors, path)
    (path / STAGE_METRICS).write_text(json.dumps({
        "stage": stage, "prev_checkpoint": str(prev) if prev else None,
        "saved_adapter_tensors_sha256": adapter_tensors_sha256(tensors),
        "start_adapter_file_sha256": sha256_file(prev / ADAPTER_WEIGHTS) if prev else None,
        "start_adapter_tensors_sha256": file_adapter_sha256(prev) if prev else None, **recorded}))
    return path


def recorded(stage_dir: Path) -> dict:
    return json.loads((stage_dir / STAGE_METRICS).read_text())


def test_lineage_check_on_hand_written_stages(tmp_path):
    stage1 = written_stage(tmp_path / "stage1", 1, lora_tensors(1))
    stage2 = written_stage(tmp_path / "stage2", 2, lora_tensors(2), stage1)

    def lineage(stage_dir: Path) -> vf.Check:
        return vf.check_lineage(stage_dir, recorded(stage_dir), saved_stage_lineage(stage_dir, recorded(stage_dir)))

    assert lineage(stage1).status == vf.PASS and "stage 1: a new adapter, trained" in lineage(stage1).detail
    assert lineage(stage2).status == vf.PASS and f"started from exactly {stage1}'s adapter" in lineage(stage2).detail
    # each way a stage can fail to continue, named
    untrained = written_stage(tmp_path / "untrained", 1, lora_tensors(1, b_scale=0.0))
    elsewhere = written_stage(tmp_path / "elsewhere", 2, lora_tensors(2), stage1, start_adapter_file_sha256="0" * 64)
    fresh = written_stage(tmp_path / "fresh", 2, lora_tensors(2), stage1,
                          start_adapter_tensors_sha256=adapter_tensors_sha256(lora_tensors(3, b_scale=0.0)))
    frozen = written_stage(tmp_path / "frozen", 2, lora_tensors(1), stage1)  # saved the very weights it loaded
    unrecorded = written_stage(tmp_path / "unrecorded", 2, lora_tensors(2), stage1, start_adapter_file_sha256=None)
    for stage_dir, reason in [
        (untrained, "every LoRA B matrix is zero: an untrained, fresh adapter was saved"),
        (elsewhere, "not the previous stage's adapter"),
        (fresh, f"were not {stage1}'s adapter: not the previous stage's adapter (a fresh one?)"),
        (frozen, "the saved adapter equals the one it started from: it did not train"),
        (unrecorded, "the stage recorded no hash of the adapter it started from"),
    ]:
        check = lineage(stage_dir)
        assert check.status == vf.FAIL and reason in check.detail, (stage_dir.name, check)
    # an adapter replaced after the stage saved it
    save_adapter_tensors(lora_tensors(4), stage2)
    check = lineage(stage2)
    assert check.status == vf.FAIL and "the adapter on disk is not the one the stage saved" in check.detail


def test_continuity_check_holds_the_first_loss_against_the_previous_final_one(tmp_path):
    stage1 = written_stage(tmp_path / "stage1", 1, lora_tensors(1), final_eval_loss=2.0)

    def continuity(first_eval_loss: float, tolerance: float = 0.10) -> vf.Check:
        stage2 = tmp_path / f"stage2_{first_eval_loss}_{tolerance}"
        written_stage(stage2, 2, lora_tensors(2), stage1, first_eval_loss=first_eval_loss)
        return vf.check_continuity(recorded(stage2), saved_stage_lineage(stage2, recorded(stage2)), tolerance)

    jump = continuity(3.0)
    assert jump.status == vf.FAIL
    assert jump.detail == ("first_eval_loss 3.0000 vs previous final_eval_loss 2.0000 (50.0%, tolerance 10%): the "
                           "stage restarted instead of continuing")
    near = continuity(2.1)
    assert near.status == vf.PASS and near.detail == "first_eval_loss 2.1000 vs previous final_eval_loss 2.0000 " \
                                                     "(5.0%, tolerance 10%)"
    assert continuity(3.0, tolerance=0.6).status == vf.PASS
    quarter = continuity(2.5)
    assert quarter.status == vf.FAIL and "(25.0%, tolerance 10%)" in quarter.detail


def test_lora_config_check_names_every_setting_that_differs(tmp_path):
    stage = written_stage(tmp_path / "stage1", 1, lora_tensors(1))

    def saved_as(**settings) -> vf.Check:
        (stage / ADAPTER_CONFIG).write_text(json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
                                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                        **settings}))
        return vf.check_lora_config(stage, LoraSettings(), "stage1.yaml")

    assert saved_as().status == vf.PASS
    for settings, difference in [
        ({"r": 8}, "lora.r: stage1.yaml says 4, the saved adapter has 8"),
        ({"lora_alpha": 16}, "lora.alpha: stage1.yaml says 8, the saved adapter has 16"),
        ({"lora_dropout": 0.1}, "lora.dropout: stage1.yaml says 0.05, the saved adapter has 0.1"),
        ({"target_modules": ["q_proj", "v_proj"]}, "lora.target_modules: stage1.yaml says ['k_proj', 'o_proj', "
                                                   "'q_proj', 'v_proj'], the saved adapter has ['q_proj', 'v_proj']"),
    ]:
        check = saved_as(**settings)
        assert check.status == vf.FAIL and check.detail == difference, settings
    all_four = saved_as(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj"])
    assert all_four.status == vf.FAIL and len(all_four.detail.split("; ")) == 4


SCRIPT = REPO / "train_qlora_qwen3vl.py"


def patched_script(tmp_path: Path, old: str, new: str) -> Path:
    text = SCRIPT.read_text()
    assert old in text
    path = tmp_path / "patched_train.py"
    path.write_text(text.replace(old, new, 1))
    return path


def test_static_check_passes_the_shipped_trainer():
    assert vf.check_training_script(SCRIPT).status == vf.PASS


LOADED_LINE = '    print_main("✓ Loaded previous adapter - continuing training on the same adapter")'


def test_static_check_finds_merge_and_unload_in_the_continue_branch(tmp_path):
    script = patched_script(tmp_path, LOADED_LINE, "    model = model.merge_and_unload()\n" + LOADED_LINE)
    code, out = verify("--script", str(script))
    assert code == 1 and "merge_and_unload() in the prev_checkpoint branch" in out
    inserted_at = SCRIPT.read_text().splitlines().index(LOADED_LINE) + 1  # the new line takes this number
    assert f"line {inserted_at}: merge_and_unload()" in out


@pytest.mark.parametrize("old, new, message", [
    ("prev_checkpoint, is_trainable=True)", "prev_checkpoint, is_trainable=False)",
     "PeftModel.from_pretrained without is_trainable=True"),
    ("prev_checkpoint, is_trainable=True)", "prev_checkpoint)", "PeftModel.from_pretrained without is_trainable=True"),
    ("    model = PeftModel.from_pretrained(", "    model = prepare_model_for_kbit_training(model)\n"
     "    model = PeftModel.from_pretrained(", "prepare_model_for_kbit_training() in the prev_checkpoint branch"),
    ("        model = continue_adapter(model, lineage.prev_checkpoint)\n",
     "        model = continue_adapter(model, lineage.prev_checkpoint)\n        model = get_peft_model(model, None)\n",
     "get_peft_model() in the prev_checkpoint branch"),
])
def test_static_check_finds_each_textbook_bug(tmp_path, old, new, message):
    check = vf.check_training_script(patched_script(tmp_path, old, new))
    assert check.status == vf.FAIL and message in check.detail


def test_static_check_ignores_comments_and_strings(tmp_path):
    script = patched_script(tmp_path, "    print_main(\"✓ Loaded previous adapter",
                            "    # never call model.merge_and_unload() here\n"
                            "    note = 'get_peft_model(model) would make a second adapter'\n"
                            "    print_main(\"✓ Loaded previous adapter")
    assert vf.check_training_script(script).status == vf.PASS


# ---------------------------------------------------------------------------------------------------------------------
# What trained a stage: recorded with it, judged from the record; today's script only compared
# ---------------------------------------------------------------------------------------------------------------------


def test_a_stage_records_the_recipe_that_trains_it_and_its_static_check():
    record = recipe_check.trained_by(SCRIPT)
    assert record["recipe"] == str(SCRIPT.resolve()) and record["sha256"] == sha256_file(SCRIPT)
    assert record["static_check"] == {"passed": True, "detail": vf.check_training_script(SCRIPT).detail
                                      .removeprefix(f"{SCRIPT}: ")}
    assert record["helpers_sha256"] == recipe_check.helpers_sha256()


def trained_by_check(tmp_path: Path, record: dict | None, today: Path = SCRIPT) -> vf.Check:
    stage = written_stage(tmp_path / "stage", 1, lora_tensors(1), **({"trained_by": record} if record else {}))
    return vf.check_trained_by(recorded(stage), today)


def test_the_trained_by_check_reads_the_stages_record_and_compares_todays_script(tmp_path):
    record = recipe_check.trained_by(SCRIPT)
    same = trained_by_check(tmp_path / "same", record)
    assert same.status == vf.PASS and same.detail.startswith(f"{SCRIPT.resolve()} (sha256 {record['sha256'][:12]}...): "
                                                             "the static check passed on it when the stage trained;")
    assert same.detail.endswith(f"; today's {SCRIPT} is that file, curriculum/ the same")
    # today's script changed since (renamed functions, a reshaped branch): information, the stage still passes
    edited = patched_script(tmp_path, "def continue_adapter(", "def reopen_adapter(")
    later = trained_by_check(tmp_path / "later", record, today=edited)
    assert later.status == vf.PASS
    assert f"today's {edited} differs (sha256 {sha256_file(edited)[:12]}...)" in later.detail
    # run by something that imports the recipe (a test fixture): said
    fixture = trained_by_check(tmp_path / "fixture", {**record, "run_as": "/x/tests/broken_variants.py"})
    assert "trained; run as /x/tests/broken_variants.py, which imported it;" in fixture.detail
    # a recipe whose check failed when it trained fails, whatever today's script is
    bad = trained_by_check(tmp_path / "bad", {**record, "static_check": {
        "passed": False, "detail": "line 7: merge_and_unload() in the prev_checkpoint branch (line 5)"}})
    assert bad.status == vf.FAIL and bad.detail.endswith(
        "failed the static check when the stage trained: line 7: merge_and_unload() in the prev_checkpoint branch "
        "(line 5)")
    # a stage trained before stages recorded it: not run, never passed
    old = trained_by_check(tmp_path / "old", None)
    assert old.status == vf.NOT_RUN and old.detail.startswith("not recorded (the stage was trained before stages "
                                                              "recorded what trained them)")


def test_script_with_a_stage_checks_the_script_once_beside_the_stages_checks(tmp_path):
    record = recipe_check.trained_by(SCRIPT)
    stage = written_stage(tmp_path / "stage1", 1, lora_tensors(1), trained_by=record)
    script = patched_script(tmp_path, LOADED_LINE, "    model = model.merge_and_unload()\n" + LOADED_LINE)
    code, out = verify(str(stage), "--skip-load", "--script", str(script))
    assert line_of(out, "trained by").startswith("✓ trained by: ") and f"today's {script} differs" in out
    assert line_of(out, "training script").startswith(f"✗ training script: {script}: line ")
    assert out.count("training script:") == 1 and code == 1
    code, out = verify(str(stage), "--skip-load")  # without --script: the stage's own files only
    assert "training script" not in out and line_of(out, "trained by").startswith("✓")


def test_bad_usage_exits_2(tmp_path):
    assert verify(str(tmp_path / "missing"))[0] == 2
    assert verify()[0] == 2
    assert verify("--curriculum", str(tmp_path))[0] == 2
    assert verify("--bogus-flag")[0] == 2
    (tmp_path / "broken.yaml").write_text("lora: [unclosed")
    code, out = verify(str(tmp_path), "--config", str(tmp_path / "broken.yaml"))
    assert code == 2 and "YAML syntax error" in out
    # (a stage's own stage_metrics.json that does not read is a damaged stage, exit 1: tests/test_damaged_stage.py)


def test_curriculum_with_differing_lora_configs_is_rejected(curriculum, tmp_path):
    root, _ = curriculum
    stages = [copy_stage(root / f"stage{s}", tmp_path / f"stage{s}") for s in (1, 2)]
    cfg = json.loads((stages[1] / ADAPTER_CONFIG).read_text())
    cfg["lora_dropout"] = 0.1
    (stages[1] / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    check = vf.check_same_lora_across(stages)
    assert check.status == vf.FAIL and "'dropout': 0.1" in check.detail
    assert vf.check_same_lora_across(stages[:1]).status == vf.PASS
