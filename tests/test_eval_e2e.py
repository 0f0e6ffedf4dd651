"""Evaluation end to end on the tiny model: chat template -> generation -> parsing -> metrics.

Memorising a handful of questions to >= 90% proves that the label mask, the chat template and the answer
parser agree: if the trainer taught one format and the parser expected another, accuracy would stay near 0.
"""

import json
from pathlib import Path

from conftest import REPO, metrics, run_script

from curriculum.config import load_config
from curriculum.data_files import load_records
from curriculum.lineage import recorded_chain
from curriculum.records import prompt_and_images
from curriculum.stage_folder import RESOLVED_CONFIG

MEMORISE = """\
stage: 1
model_name_or_path: tiny-qwen3vl
output_dir: {out}
train_file: {data}
eval_file: {data}
max_pixels: 50176
max_seq_len: 512
lr: 5.0e-3
lr_scheduler: constant_with_warmup
warmup_ratio: 0.05
max_steps: 60
batch_size: 8
eval_batch_size: 8
eval_steps: 0
logging_steps: 10
gradient_checkpointing: false
dataloader_num_workers: 0
lora:              # more capacity than the demo: the tiny random model must memorise, not generalise
  r: 32
  alpha: 64
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
"""


def test_memorised_questions_are_answered_through_the_full_path(tmp_path, tiny_model_path):
    lines = (REPO / "data/stage1/train.jsonl").read_text().splitlines()[:8]
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(ln + "\n" for ln in lines))
    (tmp_path / "images").symlink_to(REPO / "data/stage1/images")  # a linked image folder stays "inside"
    config = tmp_path / "memorise.yaml"
    config.write_text(MEMORISE.format(out=tmp_path / "stage", data=data))
    result = run_script("train_qlora_qwen3vl.py", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "stage")["dev_metrics"]
    assert m["overall"]["n"] == 8 and m["overall"]["accuracy"] >= 0.9, m
    assert {"single_choice", "numeric", "multi_label"} <= m.keys()
    predictions = [json.loads(ln) for ln in (tmp_path / "stage" / "predictions_dev.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and set(predictions[0]) == {"id", "type", "image", "prompt", "raw_output", "parsed",
                                                             "gold", "correct"}
    assert sum(p["correct"] for p in predictions) == round(m["overall"]["accuracy"] * 8)
    assert "Dev accuracy after stage 1 (8 questions, by generation)" in result.stdout
    # the same adapter through the evaluation command gives the same answers
    again = run_script("vqa_eval.py", str(config), "--split", "eval", "--out", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr[-2000:]
    redo = json.loads((tmp_path / "again" / "metrics_eval_adapter.json").read_text())["metrics"]
    assert redo["overall"]["accuracy"] == m["overall"]["accuracy"]


def test_base_model_zero_point_and_test_split(curriculum, tmp_path):
    root, _ = curriculum
    # no --out: the base has no folder of its own, so its results go beside the config's output_dir, not to the cwd
    out = tmp_path / "base_model_eval"
    result = run_script("vqa_eval.py", "configs/demo/stage1.yaml", "--no-adapter", "--split", "test", "--limit", "6",
                        "--set", "test_file=data/stage1/test.jsonl", "--set", f"output_dir={tmp_path / 'stage1'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(REPO.glob("*_base.json*")), "written into the directory it was run from"
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line == f"Wrote {out}/metrics_test_base.json and predictions_test_base.jsonl"
    report = json.loads((out / "metrics_test_base.json").read_text())
    assert report["adapter"] is None and report["metrics"]["overall"]["n"] == 6
    assert len((out / "predictions_test_base.jsonl").read_text().splitlines()) == 6
    assert "| overall | 6 |" in result.stdout
    missing = run_script("vqa_eval.py", "configs/demo/stage1.yaml", "--split", "test")
    assert missing.returncode == 2 and "no test split" in missing.stderr


def test_stage_writes_metrics_predictions_and_plots(curriculum):
    root, _ = curriculum
    for stage in (1, 2, 3):
        stage_dir = root / f"stage{stage}"
        m = metrics(stage_dir)["dev_metrics"]
        assert m["overall"]["n"] == 40 and m["overall"]["accuracy_ci95"] is not None
        assert len((stage_dir / "predictions_dev.jsonl").read_text().splitlines()) == 40
        for png in ("loss_curve.png", "accuracy_by_type.png"):
            assert (stage_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(recorded_chain(root / "stage3")) == 3
    assert list((root / "tensorboard" / "stage2").glob("events.out.tfevents.*"))


def test_predictions_say_what_was_asked_and_what_came_back(curriculum, processor):
    """Each line carries the prompt as the model read it (chat template; the image as its placeholder, and its
    file) and the raw generated text beside the parsed answer, so an answer can be reproduced outside the code."""
    root, _ = curriculum
    cfg = load_config(root / "stage2" / RESOLVED_CONFIG)
    records = {r.id: r for r in load_records(REPO / "data/stage2/dev.jsonl")}
    written = {row["id"]: row for row in map(json.loads, (REPO / "data/stage2/dev.jsonl").read_text().splitlines())}
    lines = [json.loads(ln) for ln in (root / "stage2" / "predictions_dev.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    for p in lines:
        rec = records[p["id"]]
        # the very text the answer was generated from (GenerationInputs renders it with prompt_and_images)
        assert p["prompt"] == prompt_and_images(processor, rec, cfg.min_pixels, cfg.max_pixels)[0]
        assert p["prompt"].count("<|image_pad|>") == 1 and p["image"] == rec.image  # the pixels are not in it
        assert Path(p["image"]).is_absolute()
        assert rec.prompt_messages[-1]["content"][-1]["text"] in p["prompt"]
        assert p["prompt"].endswith("<|im_start|>assistant\n")
        # gold: the file's answer as written, read here without the parser (which the row's parsed field comes from;
        # its parses of literal answers are in tests/test_metrics.py)
        assert p["gold"] == answer_as_written(written[p["id"]]), p
        assert p["correct"] == (p["parsed"] is not None and p["parsed"] == p["gold"])
        if not p["raw_output"].strip():  # the tiny model answers blank: nothing to parse
            assert p["parsed"] is None


def answer_as_written(row: dict):
    """A dev record's answer as the file writes it, in the form the parser gives: a letter, a float, sorted letters."""
    return {"single_choice": lambda a: a, "numeric": float, "multi_label": sorted}[row["type"]](row["answer"])


def test_forgetting_matrix(curriculum):
    root, _ = curriculum
    result = run_script("vqa_eval.py", "--forgetting", str(root), "--limit", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    matrix = json.loads((root / "forgetting_matrix.json").read_text())
    assert matrix["trained"] == ["base", 1, 2, 3] or matrix["trained"] == ["base", "1", "2", "3"]
    assert len(matrix["evaluated"]) == 3 and all(n == 6 for n in matrix["n"].values())
    assert all(0 <= v <= 1 for row in matrix["accuracy"].values() for v in row.values())
    table = (root / "forgetting_matrix.md").read_text()
    assert "| base (no adapter) |" in table and "| after stage 3 |" in table
    assert (root / "forgetting_matrix.png").read_bytes()[:4] == b"\x89PNG"


ADAPTED = "base_model.model.model.language_model.layers.0.self_attn.q_proj"  # one module every stage's adapter has


def test_each_forgetting_cell_comes_from_its_own_stage_adapter_on_its_own_split(curriculum, monkeypatch):
    """The tiny model answers blank, so every accuracy is 0.0% whichever adapter answered: the matrix by itself
    cannot tell the stages apart. Here evaluate_records is replaced by one that finds out what it was given: which
    adapter the model applied (the LoRA update of one adapted layer on a fixed input, held against the update each
    stage's saved tensors make, and none for the base) and which stage's dev split the records are from."""
    import torch
    from safetensors.torch import load_file

    import vqa_eval
    from curriculum.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    root, _ = curriculum
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    updates = {"base": torch.zeros(3, 128)}
    split_of = {}  # record id -> the stage whose dev split holds it
    for stage in (1, 2, 3):
        stage_dir = root / f"stage{stage}"
        tensors = load_file(str(stage_dir / ADAPTER_WEIGHTS))
        lora = json.loads((stage_dir / ADAPTER_CONFIG).read_text())
        a, b = tensors[f"{ADAPTED}.lora_A.weight"], tensors[f"{ADAPTED}.lora_B.weight"]
        updates[stage] = x @ a.T @ b.T * (lora["lora_alpha"] / lora["r"])
        for line in Path(metrics(stage_dir)["final_eval_file"]).read_text().splitlines():
            split_of[json.loads(line)["id"]] = stage
    scale = max(u.norm().item() for u in updates.values())

    def adapter_applied(model) -> str | int:
        layer = model.get_submodule(ADAPTED)
        with torch.no_grad():
            update = (layer(x) - layer.base_layer(x)).float()
        matches = [k for k, u in updates.items() if (update - u).norm().item() <= 1e-4 * scale]
        assert len(matches) == 1, {k: (update - u).norm().item() for k, u in updates.items()}
        return matches[0]

    evaluations = []

    def evaluate_records(model, processor, records, cfg):
        (split,) = {split_of[r.id] for r in records}
        accuracy = (len(evaluations) + 1) / 100  # a number for each evaluation, to find it in the matrix
        evaluations.append((adapter_applied(model), split, accuracy))
        return {"overall": {"accuracy": accuracy}}, []

    monkeypatch.setattr(vqa_eval, "evaluate_records", evaluate_records)
    matrix = vqa_eval.evaluate_forgetting(root, limit=2)
    assert matrix["trained"] == ["base", 1, 2, 3] and matrix["evaluated"] == [1, 2, 3]
    assert sorted((str(row), col) for row, col, _ in evaluations) == sorted(
        (str(row), col) for row in ["base", 1, 2, 3] for col in [1, 2, 3])  # each cell evaluated once
    for row, col, accuracy in evaluations:
        assert matrix["accuracy"][row][col] == accuracy, (row, col)  # and written where it belongs
