"""The curriculum end to end on the tiny Qwen3-VL, on the CPU: stage 1 -> 2 -> 3 through the real CLI.

`assert_continued` is the test of the product's promise. It is run against the healthy curriculum and
against the broken variants in tests/broken_variants.py (a fresh adapter in stage 2, or the adapter
reloaded with is_trainable left False), where it must fail.
"""

import pytest
from conftest import REPO, STEPS, assert_continued, metrics, run_script, run_stage, stage_args
from safetensors.torch import load_file

import train_qlora_qwen3vl as tq
from curriculum.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OPTIMIZER_MOMENTS,
    expected_lora_param_count,
    file_adapter_sha256,
    loaded_adapter_sha256,
)
from curriculum.base_model import load_processor
from curriculum.config import LoraSettings, load_config
from curriculum.data_files import load_records
from curriculum.errors import CurriculumError
from curriculum.processes import gpu_available
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS


def test_stage1_learns_enough_that_a_restart_would_show(curriculum):
    root, _ = curriculum
    m = metrics(root / "stage1")
    assert m["final_eval_loss"] <= 0.8 * m["first_eval_loss"], m  # >= 20% below the untrained model
    assert m["start_adapter_file_sha256"] is None and m["prev_checkpoint"] is None


def test_stages_2_and_3_continue_the_same_adapter(curriculum):
    root, _ = curriculum
    assert_continued(root / "stage1", root / "stage2")
    assert_continued(root / "stage2", root / "stage3")


def test_log_shows_the_curriculum_lines(curriculum):
    _, logs = curriculum
    for line in ("*** CURRICULUM LEARNING MODE ***", "Continuing training from previous checkpoint: ",
                 "Loading existing LoRA adapter (will continue training the same adapter)...",
                 "✓ Loaded previous adapter - continuing training on the same adapter",
                 "✓ Adapter is trainable and ready for continued training", "trainable params: 7,168"):
        assert line in logs[2] and line in logs[3]
    assert "CURRICULUM LEARNING MODE" not in logs[1] and "Creating a new LoRA adapter" in logs[1]
    assert "step 15/15 | loss " in logs[1]


def test_stage_logs_hold_no_warning_that_reads_like_a_broken_install(curriculum):
    """peft looking the base up on the Hub at every save and continued load, and the Trainer re-aligning the
    tokenizer's special tokens, printed warnings in every stage (issue 25): a newcomer reads them as a broken
    install. The stages' logs (stdout and stderr) hold none of them, nor any other UserWarning."""
    _, logs = curriculum
    for stage, log in logs.items():
        for noise in ("UserWarning", "Could not find a config file", "Unable to fetch remote file",
                      "The tokenizer has new PAD/BOS/EOS tokens"):
            assert noise not in log, f"stage {stage} printed {noise!r}"


def test_stage_directory_holds_adapter_processor_config_and_metrics(curriculum):
    root, _ = curriculum
    stage = root / "stage2"
    names = {p.name for p in stage.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, STAGE_METRICS, RESOLVED_CONFIG, OPTIMIZER_MOMENTS,
            "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]  # safetensors only, no pickles
    weights = load_file(str(stage / ADAPTER_WEIGHTS))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)  # the adapter only, no base weights
    assert sum(v.numel() for v in weights.values()) == metrics(stage)["trainable_params"] == 7168
    assert not (root / "stage2.saving").exists() and not (root / "stage2.partial").exists()  # atomic, cleaned up
    assert load_config(stage / RESOLVED_CONFIG).stage == 2


def test_metrics_record_what_later_stages_need(curriculum):
    root, _ = curriculum
    m2, m3 = metrics(root / "stage2"), metrics(root / "stage3")
    assert m2["prev_checkpoint"] == str((root / "stage1").resolve())
    assert m2["first_eval_file"].endswith("data/stage1/dev.jsonl")  # the split stage 1 ended on
    assert m2["final_eval_file"].endswith("data/stage2/dev.jsonl")
    assert m2["first_eval_loss_own_split"] is not None and m2["previous_final_eval_loss"] is not None
    assert [h["step"] for h in m2["train_loss_history"]] == [5, 10, 15]
    assert m2["effective_batch_size"] == 8 and m2["num_processes"] == 1
    # optimizer_state: resume carries the moments but the step counter starts anew (the stage does not end at once).
    assert m3["optimizer_state"] == "resume" and m3["global_steps"] == STEPS


def test_finished_stage_is_not_overwritten(curriculum):
    root, _ = curriculum
    before = (root / "stage1" / ADAPTER_WEIGHTS).read_bytes()
    result = run_script("train_qlora_qwen3vl.py", *stage_args(1, root))
    assert result.returncode == 2 and "already holds a finished stage" in result.stderr
    assert (root / "stage1" / ADAPTER_WEIGHTS).read_bytes() == before


def test_stage_1_continues_a_given_adapter_only_when_forced(curriculum, tmp_path):
    root, _ = curriculum
    args = ["configs/demo/stage1.yaml", "--set", f"output_dir={tmp_path / 'again'}", "--set", "max_steps=3",
            "--set", f"prev_checkpoint={root / 'stage1'}", "--set", "eval_questions=0", "--set", "tensorboard=false"]
    refused = run_script("train_qlora_qwen3vl.py", *args)
    assert refused.returncode == 2 and "stage 1 makes a new adapter" in refused.stderr
    assert not (tmp_path / "again").exists()
    run_stage(*args, "--set", "continue_at_stage_1=true")
    assert_continued(root / "stage1", tmp_path / "again")


def test_check_validates_and_summarises_the_data_without_training(tmp_path):
    result = run_script("train_qlora_qwen3vl.py", "configs/demo/stage2.yaml", "--check",
                        "--set", f"output_dir={tmp_path / 'out'}", "--set", "stage=1", "--set", "prev_checkpoint=null",
                        "--set", "batch_size=auto")  # training would need a GPU for it; checking the data does not
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    # the note where there is no GPU, none where there is one (both sides, fast: tests/test_config.py)
    assert ("Note: batch_size: auto measures GPU memory" in out) == (not gpu_available())
    for line in ("train: 200 samples (", "train images: 200 decoded, ", "eval: 40 samples (", "train lengths: ",
                 "Check passed: config and data are valid (no model loaded, nothing trained)"):
        assert line in out
    assert "Loaded 4-bit" not in out and not (tmp_path / "out").exists()


def test_broken_variant_fresh_adapter_fails_the_continuity_test(curriculum, tmp_path):
    root, _ = curriculum
    result = run_script("tests/broken_variants.py", "fresh",  # no dev answers: lineage and continuity are tested
                        *stage_args(2, root, str(tmp_path / "broken_fresh")), "--set", "eval_questions=0")
    assert result.returncode == 0, result.stderr[-2000:]
    with pytest.raises(AssertionError, match="lineage|continuity"):
        assert_continued(root / "stage1", tmp_path / "broken_fresh")
    # and the continuity number alone gives it away: it restarts near the untrained loss
    m = metrics(tmp_path / "broken_fresh")
    assert m["first_eval_loss"] > 1.2 * metrics(root / "stage1")["final_eval_loss"]
    # With the product's guards, it is stopped before training, with a message that says why.
    guarded = run_script("tests/broken_variants.py", "fresh", "--guarded",
                         *stage_args(2, root, str(tmp_path / "guarded")))
    assert guarded.returncode == 1 and "error: the adapter weights in memory differ from" in guarded.stderr
    assert "Traceback" not in guarded.stderr and not (tmp_path / "guarded").exists()


def test_broken_variant_frozen_adapter_fails_the_continuity_test(curriculum, tmp_path):
    root, _ = curriculum
    # With gradient checkpointing, k-bit preparation makes the inputs require grad, so a frozen reload trains
    # "successfully" and saves the adapter unchanged: continuity alone cannot see it, lineage does.
    frozen = run_script("tests/broken_variants.py", "frozen", *stage_args(2, root, str(tmp_path / "frozen")),
                        "--set", "gradient_checkpointing=true", "--set", "eval_questions=0")
    assert frozen.returncode == 0, frozen.stderr[-2000:]
    with pytest.raises(AssertionError, match="the adapter did not train"):
        assert_continued(root / "stage1", tmp_path / "frozen")
    # Without gradient checkpointing it dies at the first backward with a message that does not say why.
    crashed = run_script("tests/broken_variants.py", "frozen", *stage_args(2, root, str(tmp_path / "crashed")))
    assert crashed.returncode != 0 and "does not require grad" in crashed.stderr
    with pytest.raises(AssertionError, match="holds no finished stage"):
        assert_continued(root / "stage1", tmp_path / "crashed")
    # With the product's guard, it is stopped before training, with a message that says why.
    guarded = run_script("tests/broken_variants.py", "frozen", "--guarded",
                         *stage_args(2, root, str(tmp_path / "broken_guarded")))
    assert guarded.returncode == 1 and "error: 0 trainable parameters" in guarded.stderr
    assert "the adapter is frozen or duplicated" in guarded.stderr
    assert not (tmp_path / "broken_guarded").exists()


def test_trainable_check_catches_frozen_and_duplicated_adapters(curriculum, tiny_model_path):
    from peft import PeftModel

    root, _ = curriculum
    cfg = load_config("configs/demo/stage2.yaml")
    model = tq.load_quantized_base(tiny_model_path, cfg)
    frozen = PeftModel.from_pretrained(model, str(root / "stage1"))
    with pytest.raises(CurriculumError, match="0 trainable parameters"):
        tq.check_adapter_trainable(frozen, cfg.lora)
    model = tq.load_quantized_base(tiny_model_path, cfg)
    two = tq.continue_adapter(model, str(root / "stage1"))
    two.load_adapter(str(root / "stage1"), adapter_name="second", is_trainable=True)
    with pytest.raises(CurriculumError, match="exactly one adapter"):
        tq.check_adapter_trainable(two, cfg.lora)
    model = tq.load_quantized_base(tiny_model_path, cfg)
    good = tq.continue_adapter(model, str(root / "stage1"))
    assert tq.check_adapter_trainable(good, cfg.lora) == 7168
    assert loaded_adapter_sha256(good) == file_adapter_sha256(root / "stage1")


def test_expected_count_matches_qwen3vl_8b_shapes():
    """3,833,856 for r=4 on q/k/v/o of Qwen3-VL-8B, computed from module shapes on the meta device."""
    from accelerate import init_empty_weights
    from transformers import Qwen3VLForConditionalGeneration

    from tiny_qwen3vl import qwen3vl_config

    with init_empty_weights():
        model = Qwen3VLForConditionalGeneration(qwen3vl_config("8b"))
    assert expected_lora_param_count(model, LoraSettings()) == 3_833_856
    assert expected_lora_param_count(model, LoraSettings(r=8)) == 2 * 3_833_856


def test_gradients_are_the_same_after_an_evaluation_pass(tiny_model_path, tmp_path):
    """first_eval_loss runs a no-grad pass before training; bitsandbytes must not switch the 4-bit layers to
    its inference-only CPU layout there, or backprop through them silently stops."""
    import torch

    cfg = load_config("configs/demo/stage1.yaml")
    processor = load_processor(tiny_model_path, cfg)
    (rec,) = load_records(REPO / "data/stage2/train.jsonl")[:1]
    batch = tq.collate_batch([tq.encode_example(processor, rec, cfg.min_pixels, cfg.max_pixels)], 151643)

    def lora_grads(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
        with torch.no_grad():  # make B non-zero so that A's gradients depend on what flows through the base
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = lora_grads(False), lora_grads(True)
    assert plain.keys() == after_eval.keys()
    for name in plain:
        assert torch.allclose(plain[name], after_eval[name], rtol=1e-3, atol=1e-6), name
