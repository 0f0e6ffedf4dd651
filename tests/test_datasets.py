"""Splits as Hugging Face datasets (parquet, arrow, a dataset folder) read into the same Records as JSONL, with the
same checks and errors (`file:row N`). The datasets are built here, from the shipped JSONL and its images."""

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script

import train_qlora_qwen3vl as tq
from curriculum.config import DataColumns, StageConfig, load_config
from curriculum.data_files import load_records, read_records
from curriculum.errors import ConfigError

JSONL = REPO / "data/stage1/train.jsonl"
N = 12


def cfg(tmp_path: Path, **kw) -> StageConfig:
    return StageConfig(**{"output_dir": str(tmp_path / "curriculum" / "stage1"), "train_file": "t",
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


COLUMNS = DataColumns(id="qid", question="q", type="kind", options="choices", answer="gold", image="picture")


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
    records, problems = read_records(path, "Be brief.", columns=COLUMNS, image_dir=image_dir)
    expected = load_records(JSONL, "Be brief.")[:N]
    assert problems == [] and len(records) == N
    assert {r.type for r in records} == {"single_choice", "numeric", "multi_label"}
    for got, want in zip(records, expected, strict=True):
        assert (got.id, got.type, got.answer, got.options, got.prompt_messages) == \
               (want.id, want.type, want.answer, want.options, want.prompt_messages)
        # the image's bytes became a file beside the stages' cache, named by its content
        assert Path(got.image).parent == image_dir and Path(got.image).read_bytes() == Path(want.image).read_bytes()
    assert [r.source for r in records[:2]] == [f"{path}:row 0", f"{path}:row 1"]
    # read again (another stage, a rerun): the same files, not new copies
    again, _ = read_records(path, "Be brief.", columns=COLUMNS, image_dir=image_dir)
    assert [r.image for r in again] == [r.image for r in records] and len(list(image_dir.iterdir())) == N


def test_arrow_file_save_to_disk_folder_and_imagefolder_read_alike(tmp_path):
    from datasets import Dataset

    rows = shipped_rows()
    want = [(r.id, r.type, r.answer) for r in load_records(JSONL)[:N]]
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
        records, problems = read_records(path, columns=columns, image_dir=tmp_path / "extracted")
        assert problems == [] and [(r.id, r.type, r.answer) for r in records] == want, path
        assert all(Path(r.image).read_bytes() == (JSONL.parent / row["image"]).read_bytes()
                   for r, row in zip(records, rows, strict=True))
    # the imagefolder's images are read where they are (inside the dataset's folder), not copied
    records, _ = read_records(folder, image_dir=tmp_path / "unused")
    assert Path(records[0].image) == folder / "train" / rows[0]["image"] and not (tmp_path / "unused").exists()


def test_bad_rows_are_named_by_file_and_row_then_listed_or_skipped(tmp_path, processor):
    rows = shipped_rows(5)
    rows[1] = {**rows[1], "answer": None}                                          # row 1: no answer
    rows[2] = {**rows[2], "type": "single_choice", "options": ["a", "b"], "answer": "E"}  # row 2: not an option
    images = image_cells(rows)
    images[3] = {"bytes": images[3]["bytes"][:80], "path": "cut.png"}             # row 3: a truncated image
    path = write_parquet(tmp_path / "bad.parquet", rows, images)
    with pytest.raises(ConfigError) as err:
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
    with pytest.raises(ConfigError) as err:
        read_records(path, image_dir=tmp_path)  # our default names: question, answer (or answers)
    text = str(err.value)
    # only the question and its answer are needed: no id (the row is the id), no type (inferred per row)
    assert text.startswith(f"{path}: no column 'question' (columns.question), 'answer' (columns.answer) or 'answers' "
                           "(columns.references); its columns are qid, q, kind, choices, gold, picture. Name yours "
                           "under `columns:` in the config")


def test_validate_config_takes_dataset_files_and_folders(tmp_path):
    for name in ("a.parquet", "b.arrow", "c.csv"):
        (tmp_path / name).write_text("")
    (tmp_path / "folder").mkdir()
    ok = cfg(tmp_path, train_file=str(tmp_path / "a.parquet"), eval_file=str(tmp_path / "folder"),
             test_file=str(tmp_path / "b.arrow"), batch_size=1)
    tq.validate_config(ok)
    bad = cfg(tmp_path, train_file=str(tmp_path / "c.csv"), eval_file=str(tmp_path / "gone"), batch_size=1,
              columns=DataColumns(question="text", answer="text"))
    with pytest.raises(ConfigError) as err:
        tq.validate_config(bad)
    text = str(err.value)
    assert f"train_file: {tmp_path / 'c.csv'} is not a split the trainer reads: a .jsonl, .parquet or .arrow" in text
    assert f"eval_file: file not found: {tmp_path / 'gone'}" in text
    assert "columns: 'text' is named for question, answer; each field has a column of its own" in text


def test_columns_are_config_keys_checked_like_any_other(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: o\ntrain_file: t.parquet\ncolumns:\n  question: q\n  imgae: img\n")
    with pytest.raises(ConfigError, match=re.escape("unknown key 'columns.imgae' (did you mean 'image'?)")):
        load_config(config)
    config.write_text("output_dir: o\ntrain_file: t.parquet\ncolumns:\n  question: q\n")
    assert load_config(config).columns == DataColumns(question="q")


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
    records = load_records(path, columns=DataColumns(question="q"))
    assert [r.prompt_messages for r in records] == [r.prompt_messages for r in load_records(JSONL)[:3]]
    with pytest.raises(ConfigError, match=r"renamed.jsonl:1: missing field\(s\) question"):
        load_records(path)


# ---------------------------------------------------------------------------------------------------------------------
# The Hub's own shapes: a plain table with no columns: block, and four public datasets' schemas through columns: alone
# (the rows under tests/hub_schemas/ are made by its make_hub_schemas.py, in the schemas of the datasets' cards)
# ---------------------------------------------------------------------------------------------------------------------

HUB = REPO / "tests" / "hub_schemas"
sys.path.insert(0, str(HUB))
from make_hub_schemas import COLUMNS as HUB_COLUMNS  # noqa: E402


def hub_records(tmp_path: Path, name: str, split: str = "train") -> list:
    records, problems = read_records(HUB / name / f"{split}.parquet", columns=DataColumns(**HUB_COLUMNS[name]),
                                     image_dir=tmp_path / "images")
    assert problems == []
    return records


def test_a_table_of_image_question_answer_needs_no_columns(tmp_path):
    path = HUB / "plain" / "train.parquet"
    for columns in (None, DataColumns()):  # no columns: block, as the trainer reads it
        records, problems = read_records(path, columns=columns, image_dir=tmp_path / "images")
        assert problems == [] and len(records) == 6
        assert [r.type for r in records[:3]] == ["free_text", "numeric", "free_text"]
        assert [r.answer for r in records[:3]] == ["red", "1", "white, blue"]  # free text, a number, a list of names
        assert [r.id for r in records[:2]] == [f"{path}:row 0", f"{path}:row 1"]  # the file and row are the id
        assert all(r.type_inferred and Path(r.image).is_file() for r in records)


def test_scienceqa_choices_and_an_index_answer(tmp_path):
    rec = hub_records(tmp_path, "scienceqa")[2]
    assert (rec.type, rec.options, rec.answer) == ("single_choice", ["red", "green", "blue", "yellow"], "C")
    assert rec.prompt_messages[-1]["content"][-1]["text"] == ("Which color is the square?\nA. red\nB. green\nC. blue\n"
                                                              "D. yellow\nAnswer with the option's letter.")


def test_chartqa_query_and_label_list(tmp_path):
    records = hub_records(tmp_path, "chartqa")
    assert {r.type for r in records} == {"free_text"}
    assert [(r.answer, r.references) for r in records[:3]] == [("4", ["4"]), ("Green", ["Green"]), ("Yes", ["Yes"])]
    assert records[0].prompt_messages[-1]["content"][-1]["text"].startswith("What is the value of the red bar?\n")


def test_vqav2_answer_dicts_and_its_multiple_choice_answer(tmp_path):
    records = hub_records(tmp_path, "vqav2")
    assert [r.id for r in records[:2]] == ["1007", "2007"] and {r.type for r in records} == {"free_text"}
    assert records[1].answer == "1" and records[1].references == ["1"] * 7 + ["one", "one", "2"]
    assert len(records[0].references) == 10  # so VQA accuracy is reported for it


def test_docvqa_answers_list_and_string_ids(tmp_path):
    records = hub_records(tmp_path, "docvqa")
    assert [r.id for r in records[:2]] == ["train-5000", "train-5001"]
    assert (records[1].answer, records[1].references) == ("$13.50", ["$13.50", "13.50"])


def test_the_hub_schemas_are_the_ones_the_script_makes():
    """The committed files hold what tests/hub_schemas/make_hub_schemas.py writes, in the cards' column types."""
    import make_hub_schemas
    from datasets import Dataset

    for (name, split), (features, rows) in make_hub_schemas.tables().items():
        stored = Dataset.from_parquet(str(HUB / name / f"{split}.parquet"))
        assert stored.features == features, (name, split)
        assert stored.with_format("arrow")[:].to_pylist() == rows, (name, split)


def test_answer_and_references_may_share_a_column(tmp_path):
    (tmp_path / "a.parquet").write_text("")
    tq.validate_config(cfg(tmp_path, train_file=str(tmp_path / "a.parquet"), batch_size=1,
                           columns=DataColumns(question="query", answer="label", references="label")))
    # ChartQA's label list as the answer column reads as it does as the references column: free text, its references
    path = HUB / "chartqa" / "train.parquet"
    as_answer, _ = read_records(path, columns=DataColumns(question="query", answer="label"),
                                image_dir=tmp_path / "images")
    assert [(r.type, r.answer, r.references) for r in as_answer] == \
           [(r.type, r.answer, r.references) for r in hub_records(tmp_path, "chartqa")]


def test_a_table_row_that_cannot_be_mapped_is_one_line_naming_file_row_and_column(tmp_path):
    import make_hub_schemas
    from datasets import Dataset

    features, rows = make_hub_schemas.scienceqa(3, "bad")
    rows[1]["answer"] = 7  # ScienceQA's answer is an index into choices: past them here
    path = tmp_path / "scienceqa.parquet"
    Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features).to_parquet(str(path))
    records, problems = read_records(path, columns=DataColumns(options="choices"), image_dir=tmp_path / "images")
    assert len(records) == 2 and problems == [
        f"{path}:row 1: column 'answer' (columns.answer): index 7 is not one of the 3 options of column 'choices' "
        "(columns.options) (0 to 2)"]
