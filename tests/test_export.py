"""export_merged.py: the last stage's adapter merged into the bf16 base, written as a plain Transformers folder,
and checked against the unmerged adapter. On the CPU, in bfloat16 as on a GPU (the tiny model is fast enough)."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_script

import export_merged as em
from curriculum.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter_file
from curriculum.config import load_config
from curriculum.data_files import load_records
from curriculum.stage_folder import RESOLVED_CONFIG

CHECKED = 4


@pytest.fixture(scope="module")
def merged(curriculum, tmp_path_factory) -> tuple[Path, str]:
    root, _ = curriculum
    out = tmp_path_factory.mktemp("export") / "merged"
    result = run_script("export_merged.py", str(root / "stage3"), str(out), "--check", str(CHECKED))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_export_writes_a_plain_transformers_model_with_its_processor(merged, curriculum):
    out, stdout = merged
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja", em.CHECK_FILE} <= names
    assert not names & {ADAPTER_CONFIG, ADAPTER_WEIGHTS} and not out.with_name("merged.exporting").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"] and "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora_" in k or "base_layer" in k]  # merged: no peft names left
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    # the processor resizes images as the stage trained them
    size = json.loads((out / "processor_config.json").read_text())["image_processor"]["size"]
    cfg = load_config(curriculum[0] / "stage3" / RESOLVED_CONFIG)
    assert size == {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    assert f"Serve it: vllm serve {out}" in stdout


def test_merged_weights_are_base_plus_the_scaled_lora_product(merged, curriculum, tiny_model_path):
    from safetensors.torch import load_file

    root, _ = curriculum
    out, _ = merged
    cfg = load_config(root / "stage3" / RESOLVED_CONFIG)
    base, adapter = load_file(str(Path(tiny_model_path) / "model.safetensors")), read_adapter_file(root / "stage3")
    weights = load_file(str(out / "model.safetensors"))
    name = "model.language_model.layers.1.self_attn.v_proj.weight"
    a = adapter[f"base_model.model.{name.replace('.weight', '.lora_A.weight')}"].float()
    b = adapter[f"base_model.model.{name.replace('.weight', '.lora_B.weight')}"].float()
    delta = cfg.lora.alpha / cfg.lora.r * b @ a
    # peft rounds the update to bf16, then the sum: each rounding is within half a step, 2**-8 of the value
    bf16_rounding = 2**-7 * (base[name].float().abs() + delta.abs())
    assert ((weights[name].float() - (base[name].float() + delta)).abs() <= bf16_rounding).all()
    assert ((weights[name].float() - base[name].float()).abs() > bf16_rounding).any()  # the update is in it


def test_export_check_compares_answers_and_logits_with_the_adapter_model(merged):
    out, stdout = merged
    report = json.loads((out / em.CHECK_FILE).read_text())
    assert report["passed"] and report["questions"] == CHECKED and report["dtype"] == "bfloat16"
    assert report["identical_answers"] == CHECKED, report["per_question"]
    assert report["logit_tolerance"] == em.LOGIT_TOLERANCE
    for row in report["per_question"]:
        assert row["merge_diff"] <= em.LOGIT_TOLERANCE * row["largest_logit"] and row["problems"] == []
        assert row["merge_diff"] < row["adapter_effect"] / 10  # on this model: rounding, against a real update
    assert f"Check on {CHECKED} questions of " in stdout and f"{CHECKED} of {CHECKED} answers identical" in stdout


def test_check_fails_on_a_model_that_is_not_this_adapters_merge(merged, curriculum, tiny_model_path):
    root, _ = curriculum
    out, _ = merged
    cfg = em.stage_config(root / "stage2")
    records = load_records(cfg.eval_file)[:2]
    # stage 3's merge is not stage 2's adapter: the logits are far apart
    rows = em.check_merged(tiny_model_path, root / "stage2", out, records, cfg)
    assert all(any("over the tolerance" in p for p in r["problems"]) for r in rows), rows
    # the base itself, unmerged, is as far from the adapter model as the base is: no merge happened
    rows = em.check_merged(tiny_model_path, root / "stage3", Path(tiny_model_path), records, cfg)
    assert all(any("cannot be told from no merge" in p for p in r["problems"]) for r in rows), rows


def test_compare_question_on_literal_numbers():
    same = {"adapter_answer": "B", "merged_answer": "B", "merge_diff": 0.05, "adapter_effect": 4.0,
            "largest_logit": 10.0, "closest_margin": 2.0}
    assert em.compare_question(same) == []
    assert em.compare_question(same | {"merged_answer": "C", "closest_margin": 0.2}) == []  # a near tie flipped
    (problem,) = em.compare_question(same | {"merged_answer": "C"})
    assert problem.startswith("answers 'C' (merged) and 'B' (adapter), with no near tie")
    (problem,) = em.compare_question(same | {"merge_diff": 0.5})
    assert problem == "logits differ by up to 0.500, over the tolerance 0.300 (0.03 of the largest logit, 10.00)"
    (problem,) = em.compare_question(same | {"adapter_effect": 0.05})
    assert "the merge cannot be told from no merge" in problem


def test_a_failed_check_says_what_it_means_and_what_to_do():
    """An update too small for bf16 weights (the adapter moves the logits less than the merge's rounding) is not a
    broken merge: the advice is to serve the adapter unmerged, with the command, or to train further."""
    too_small = {"adapter_answer": "B", "merged_answer": "B", "merge_diff": 0.2, "adapter_effect": 0.17,
                 "largest_logit": 20.0, "closest_margin": 2.0}
    advice = em.failure_advice([too_small, too_small | {"adapter_effect": 0.1}], "Qwen/Qwen3-VL-8B-Instruct",
                               Path("models/exp4/stage1"))
    assert "below what bfloat16 weights can hold" in advice and "at most 0.170" in advice
    assert "vllm serve Qwen/Qwen3-VL-8B-Instruct --enable-lora --lora-modules stage1=models/exp4/stage1" in advice
    assert "train it further" in advice
    wrong = too_small | {"merge_diff": 3.0, "adapter_effect": 5.0}
    advice = em.failure_advice([too_small, wrong], "base", Path("s"))
    assert "the merge went wrong" in advice and "unmerged" not in advice


def test_a_quantized_base_is_refused_with_the_reason(curriculum, tmp_path, tiny_model_path):
    root, _ = curriculum
    quantized = tmp_path / "tiny-bnb-4bit"
    quantized.mkdir()
    config = json.loads((Path(tiny_model_path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (quantized / "config.json").write_text(json.dumps(config))
    result = run_script("export_merged.py", str(root / "stage3"), str(tmp_path / "out"), "--base", str(quantized))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: the base {quantized} is stored quantized (bitsandbytes). Merging into it would round" \
           in result.stderr
    assert "Export from the unquantized (bf16) checkpoint" in result.stderr and not (tmp_path / "out").exists()


def test_export_refuses_what_is_not_a_stage_or_an_existing_folder(curriculum, tmp_path):
    root, _ = curriculum
    not_stage = run_script("export_merged.py", str(tmp_path), str(tmp_path / "out"))
    assert not_stage.returncode == 2 and f"error: {tmp_path}: not a stage folder with a LoRA adapter" \
        in not_stage.stderr
    shutil.copytree(root / "stage1", tmp_path / "taken")
    taken = run_script("export_merged.py", str(root / "stage1"), str(tmp_path / "taken"), "--check", "0")
    assert taken.returncode == 2 and "exists; choose a new OUT_DIR" in taken.stderr
