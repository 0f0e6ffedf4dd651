"""Splits as Hugging Face datasets (parquet, arrow, a dataset folder) read into the same Records as JSONL, with the
same checks and errors (`file:row N`). The datasets are built here, from the shipped JSONL and its images."""

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, run_script

import train_qlora_qwen3vl as tq

JSONL = REPO / "data/stage1/train.jsonl"
N = 12


def cfg(tmp_path: Path, **kw) -> tq.StageConfig:
    return tq.StageConfig(**{"output_dir": str(tmp_path / "curriculum" / "stage1"), "train_file": "t",
                             "cache_image_checks": False, **kw})


def shipped_rows(n: int = N) -> list[dict]:
    return [json.loads(line) for line in JSONL.read_text().splitlines()[:n]]


def as_table(rows: list[dict], images: list) -> dict:
    """Rows as table columns under other names than ours (qid, q, kind, choices, gold, picture); a multi-label
    answer as text (`A, C`), since a table column holds one type."""
    return {"qid": [r["id"] for r in rows], "q": [r["question"] for r in rows], "kind": [r["type"] for r in rows],
            "choices": [r["options"] for r in rows],
            "gold": [", ".join(r["answer"]) if isinstance(r["answer"], list) else None if r["answer"] is None
                     else str(r["answer"]) for r in rows],
            "picture": images}


COLUMNS = tq.DataColumns(id="qid", question="q", type="kind", options="choices", answer="gold", image="picture")


def features():
    from datasets import Features, Image, List, Value

    return Features({"qid": Value("string"), "q": Value("string"), "kind": Value("string"),
                     "choices": List(Value("string")), "gold": Value("string"), "picture": Image()})


def write_parquet(path: Path, rows: list[dict], images: list) -> Path:
    """A parquet split with an `Image` column that holds each image's bytes, as `datasets` writes one."""
    from datasets import Dataset

    Dataset.from_dict(as_table(rows, images), features=features()).to_parquet(str(path))
    return path


def image_cells(rows: list[dict]) -> list[dict]:
    return [{"bytes": (JSONL.parent / r["image"]).read_bytes(), "path": Path(r["image"]).name} for r in rows]


def test_parquet_with_an_image_column_gives_the_records_of_the_jsonl(tmp_path):
    rows = shipped_rows()
    path = write_parquet(tmp_path / "train.parquet", rows, image_cells(rows))
    image_dir = tmp_path / "images"
    records, problems = tq.read_records(path, "Be brief.", columns=COLUMNS, image_dir=image_dir)
    expected = tq.load_records(JSONL, "Be brief.")[:N]
    assert problems == [] and len(records) == N
    assert {r.type for r in records} == {"single_choice", "numeric", "multi_label"}
    for got, want in zip(records, expected, strict=True):
        assert (got.id, got.type, got.answer, got.options, got.prompt_messages) == \
               (want.id, want.type, want.answer, want.options, want.prompt_messages)
        # the image's bytes became a file beside the stages' cache, named by its content
        assert Path(got.image).parent == image_dir and Path(got.image).read_bytes() == Path(want.image).read_bytes()
    assert [r.source for r in records[:2]] == [f"{path}:row 0", f"{path}:row 1"]
    # read again (another stage, a rerun): the same files, not new copies
    again, _ = tq.read_records(path, "Be brief.", columns=COLUMNS, image_dir=image_dir)
    assert [r.image for r in again] == [r.image for r in records] and len(list(image_dir.iterdir())) == N


def test_arrow_file_save_to_disk_folder_and_imagefolder_read_alike(tmp_path):
    from datasets import Dataset

    rows = shipped_rows()
    want = [(r.id, r.type, r.answer) for r in tq.load_records(JSONL)[:N]]
    saved = tmp_path / "saved"
    Dataset.from_dict(as_table(rows, image_cells(rows)), features=features()).save_to_disk(str(saved))
    (arrow,) = saved.glob("*.arrow")
    # an imagefolder: the images as files beside a metadata.jsonl, in our own field names (no columns: needed), in
    # a folder per split as datasets lays them out (it would take `train_0001.png` beside it for a split's name)
    folder = tmp_path / "imagefolder"
    (folder / "train" / "images").mkdir(parents=True)
    with (folder / "train" / "metadata.jsonl").open("w") as f:
        for r in rows:
            (folder / "train" / r["image"]).write_bytes((JSONL.parent / r["image"]).read_bytes())
            answer = ", ".join(r["answer"]) if isinstance(r["answer"], list) else r["answer"]
            f.write(json.dumps({"file_name": r["image"], **{k: r[k] for k in ("id", "question", "type", "options")},
                                "answer": answer}) + "\n")
    for path, columns in ((saved, COLUMNS), (arrow, COLUMNS), (folder, None)):
        records, problems = tq.read_records(path, columns=columns, image_dir=tmp_path / "extracted")
        assert problems == [] and [(r.id, r.type, r.answer) for r in records] == want, path
        assert all(Path(r.image).read_bytes() == (JSONL.parent / row["image"]).read_bytes()
                   for r, row in zip(records, rows, strict=True))
    # the imagefolder's images are read where they are (inside the dataset's folder), not copied
    records, _ = tq.read_records(folder, image_dir=tmp_path / "unused")
    assert Path(records[0].image) == folder / "train" / rows[0]["image"] and not (tmp_path / "unused").exists()


def test_bad_rows_are_named_by_file_and_row_then_listed_or_skipped(tmp_path, processor):
    rows = shipped_rows(5)
    rows[1] = {**rows[1], "answer": None}                                          # row 1: no answer
    rows[2] = {**rows[2], "type": "single_choice", "options": ["a", "b"], "answer": "E"}  # row 2: not an option
    images = image_cells(rows)
    images[3] = {"bytes": images[3]["bytes"][:80], "path": "cut.png"}             # row 3: a truncated image
    path = write_parquet(tmp_path / "bad.parquet", rows, images)
    with pytest.raises(tq.ConfigError) as err:
        tq.load_split(str(path), processor, cfg(tmp_path, columns=COLUMNS), "train")
    text = str(err.value)
    assert text.startswith(f"3 bad record(s) in {path}:") and "on_bad_record: skip" in text
    for row, why in ((1, "missing field(s) answer"), (2, "answer 'E' is not among the options' letters A, B"),
                     (3, "cannot read image")):
        assert f"bad.parquet:row {row}: {why}" in text
    kept = tq.load_split(str(path), processor, cfg(tmp_path, columns=COLUMNS, on_bad_record="skip"), "train")
    assert [r.id for r in kept.records] == [rows[0]["id"], rows[4]["id"]] and len(kept.bad_records) == 3


def test_a_missing_column_names_the_config_key_and_the_columns_there_are(tmp_path):
    rows = shipped_rows(2)
    path = write_parquet(tmp_path / "split.parquet", rows, image_cells(rows))
    with pytest.raises(tq.ConfigError) as err:
        tq.read_records(path, image_dir=tmp_path)  # our default names: id, question, type, answer
    text = str(err.value)
    assert text.startswith(f"{path}: no column 'id' (columns.id), 'question' (columns.question), 'type' "
                           "(columns.type), 'answer' (columns.answer); its columns are qid, q, kind, choices, gold, "
                           "picture. Name yours under `columns:` in the config")


def test_validate_config_takes_dataset_files_and_folders(tmp_path):
    for name in ("a.parquet", "b.arrow", "c.csv"):
        (tmp_path / name).write_text("")
    (tmp_path / "folder").mkdir()
    ok = cfg(tmp_path, train_file=str(tmp_path / "a.parquet"), eval_file=str(tmp_path / "folder"),
             test_file=str(tmp_path / "b.arrow"), batch_size=1)
    tq.validate_config(ok)
    bad = cfg(tmp_path, train_file=str(tmp_path / "c.csv"), eval_file=str(tmp_path / "gone"), batch_size=1,
              columns=tq.DataColumns(question="text", answer="text"))
    with pytest.raises(tq.ConfigError) as err:
        tq.validate_config(bad)
    text = str(err.value)
    assert f"train_file: {tmp_path / 'c.csv'} is not a split the trainer reads: a .jsonl, .parquet or .arrow" in text
    assert f"eval_file: file not found: {tmp_path / 'gone'}" in text
    assert "columns: 'text' is named for question, answer; each field has a column of its own" in text


def test_columns_are_config_keys_checked_like_any_other(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: o\ntrain_file: t.parquet\ncolumns:\n  question: q\n  imgae: img\n")
    with pytest.raises(tq.ConfigError, match=re.escape("unknown key 'columns.imgae' (did you mean 'image'?)")):
        tq.load_config(config)
    config.write_text("output_dir: o\ntrain_file: t.parquet\ncolumns:\n  question: q\n")
    assert tq.load_config(config).columns == tq.DataColumns(question="q")


def test_check_summarises_a_parquet_and_a_dataset_folder(tmp_path):
    from datasets import Dataset

    rows = shipped_rows()
    train = write_parquet(tmp_path / "train.parquet", rows, image_cells(rows))
    dev = tmp_path / "dev"
    Dataset.from_dict(as_table(rows[:6], image_cells(rows[:6])), features=features()).save_to_disk(str(dev))
    result = run_script("train_qlora_qwen3vl.py", "configs/demo/stage1.yaml", "--check",
                        "--set", f"output_dir={tmp_path / 'curriculum' / 'stage1'}", "--set", f"train_file={train}",
                        "--set", f"eval_file={dev}", "--set", "columns={id: qid, question: q, type: kind, "
                        "options: choices, answer: gold, image: picture}")
    assert result.returncode == 0, result.stderr[-3000:]
    for line in (f"{train}: {N} images stored in the dataset, read from their files in {tmp_path / 'curriculum'}",
                 f"Loaded train from {train}:", f"train: {N} samples (", f"train images: {N} decoded, 224x224",
                 f"Loaded eval from {dev}:", "eval: 6 samples (", "train lengths: ",
                 "Check passed: config and data are valid (no model loaded, nothing trained)"):
        assert line in result.stdout
    assert len(list((tmp_path / "curriculum" / ".cache" / "dataset_images").iterdir())) == N


def test_columns_rename_jsonl_keys_too(tmp_path):
    rows = [{**{k: v for k, v in r.items() if k != "question"}, "q": r["question"]} for r in shipped_rows(3)]
    (tmp_path / "images").symlink_to(JSONL.parent / "images")
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = tq.load_records(path, columns=tq.DataColumns(question="q"))
    assert [r.prompt_messages for r in records] == [r.prompt_messages for r in tq.load_records(JSONL)[:3]]
    with pytest.raises(tq.ConfigError, match=r"renamed.jsonl:1: missing field\(s\) question"):
        tq.load_records(path)
