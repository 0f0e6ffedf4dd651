"""A curriculum without forgetting (curriculum/forgetting.py): a stage watches every earlier stage's dev split,
forgetting_tolerance warns or stops it, and replay mixes in a seeded share of earlier stages' training records.

The pure parts run without a model; the CLI runs (marked slow by their fixtures) train the tiny model."""

import dataclasses
import json
import shutil
import types
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, metrics, run_script, stage_args

import train_qlora_qwen3vl as tq
from curriculum import forgetting, plots
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.config import DataColumns, ReplaySettings, StageConfig, load_config
from curriculum.errors import ConfigError
from curriculum.hashing import sha256_file
from curriculum.lineage import RecordedStage, resolve_lineage
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS


def fake_stage(path: Path, stage: int, prev: Path | None, train_file: str = "data/stage1/train.jsonl",
               eval_file: str | None = None) -> Path:
    """A folder that reads as a finished stage to the lineage: stage_metrics.json and an adapter file."""
    path.mkdir(parents=True)
    (path / ADAPTER_WEIGHTS).write_bytes(b"")  # previous_stage_dir looks for the adapter
    sha = sha256_file(REPO / train_file) if (REPO / train_file).is_file() else "0" * 64
    (path / STAGE_METRICS).write_text(json.dumps({
        "stage": stage, "prev_checkpoint": str(prev) if prev else None,
        "final_eval_file": eval_file or str(REPO / f"data/stage{stage}/dev.jsonl"),
        "data_files": {"train_file": {"path": train_file, "sha256": sha}}}))
    return path


@pytest.fixture
def lineage_dirs(tmp_path, monkeypatch) -> Path:
    """stage1 <- stage2 <- stage3, as the trainer records them (stage 3 is the prev_checkpoint of a stage 4). Run from
    the repository, as the recorded train_file paths are relative to it."""
    monkeypatch.chdir(REPO)
    s1 = fake_stage(tmp_path / "stage1", 1, None, "data/stage1/train.jsonl")
    s2 = fake_stage(tmp_path / "stage2", 2, s1, "data/stage2/train.jsonl")
    fake_stage(tmp_path / "stage3", 3, s2, "data/stage3/train.jsonl")
    return tmp_path


def read_lineage(prev: Path) -> tuple[RecordedStage, ...]:
    """The lineage of a stage whose prev_checkpoint is `prev`."""
    return resolve_lineage(str(prev)).chain


def test_the_lineage_is_the_prev_checkpoint_chain_oldest_first(lineage_dirs):
    chain = read_lineage(lineage_dirs / "stage3")
    assert [(s.stage, s.dir.name) for s in chain] == [(1, "stage1"), (2, "stage2"), (3, "stage3")]
    assert chain[0].eval_file == str(REPO / "data/stage1/dev.jsonl") and chain[1].name == "stage2"
    assert chain[2].train_file["path"] == "data/stage3/train.jsonl"
    # a moved curriculum: the recorded path is gone, the folder of that name beside the stage is used
    moved = lineage_dirs.parent / "moved"
    shutil.move(lineage_dirs, moved)
    assert [s.dir for s in read_lineage(moved / "stage3")] == [moved / "stage1", moved / "stage2", moved / "stage3"]
    assert read_lineage(moved / "nothing here") == () and resolve_lineage(None).chain == ()
    (moved / "stage1" / STAGE_METRICS).write_text("{not json")  # damaged: the stages before it stay unknown
    assert [s.stage for s in read_lineage(moved / "stage3")] == [2, 3]


# ---------------------------------------------------------------------------------------------------------------------
# (b) replay: the stated share, from the stated stages, reproducibly
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_own, fraction", [(200, 0.2), (200, 0.5), (37, 0.1), (1000, 0.05), (10, 0.9)])
def test_replay_count_makes_the_fraction_of_the_mixed_set(n_own, fraction):
    n = forgetting.replay_count(n_own, fraction)
    assert abs(n / (n_own + n) - fraction) <= 1 / (n_own + n)  # as close as whole records allow
    assert forgetting.replay_count(200, 0.2) == 50 and forgetting.replay_count(200, 0.0) == 0


def test_choose_replay_is_seeded_and_draws_only_from_the_pools_given():
    pools = {1: 200, 2: 150}
    first = forgetting.choose_replay(pools, 200, 0.2, seed=42)
    assert first == forgetting.choose_replay(pools, 200, 0.2, seed=42)  # same seed, same records
    assert first != forgetting.choose_replay(pools, 200, 0.2, seed=43)  # another seed, others
    assert sum(len(v) for v in first.values()) == 50 and set(first) == {1, 2}
    assert all(len(set(v)) == len(v) and all(0 <= i < pools[s] for i in v) for s, v in first.items())
    assert forgetting.choose_replay({1: 200}, 200, 0.2, seed=42).keys() == {1}
    assert sum(map(len, forgetting.choose_replay({1: 10}, 200, 0.5, seed=0).values())) == 10  # at most the pool


class FakeSplit:
    """A loaded split as replay_records sees it: records (with an id) and their token lengths."""

    def __init__(self, prefix: str, n: int):
        self.records = [types.SimpleNamespace(id=f"{prefix}-{i}") for i in range(n)]
        self.lengths = list(range(n))

    def __len__(self) -> int:
        return len(self.records)


def mixed(lineage_dirs: Path, fraction: float, stages, seed: int = 42) -> tuple[FakeSplit, dict]:
    """200 records of this stage's and those replay_records draws, as the recipe mixes them; and the record."""
    chain = read_lineage(lineage_dirs / "stage2")
    own = FakeSplit("own", 200)
    loaded = []
    replayed = forgetting.replay_records(ReplaySettings(fraction=fraction, stages=stages), seed, len(own), chain,
                                         lambda path, name, stage: loaded.append((path, stage.stage))
                                         or FakeSplit(Path(path).parent.name, 200))
    # each file is read as the stage that trained on it read it (its columns): the loader is told which stage
    assert loaded == [(s.train_file["path"], s.stage) for s in forgetting.replay_sources(stages, chain)]
    assert len(own) == 200  # this stage's own split stays as it was; the recipe makes the mixed one
    own.records, own.lengths = own.records + replayed.records, own.lengths + replayed.lengths
    return own, replayed.record


def test_replay_adds_the_share_from_the_stated_stages_and_records_them(lineage_dirs):
    own, record = mixed(lineage_dirs, 0.2, [1])
    replayed = own.records[200:]
    assert len(own) == 250 and len(own.lengths) == 250 and len(replayed) == 50
    assert {r.id.split("-")[0] for r in replayed} == {"stage1"}  # only stage 1's records
    assert record["stages"] == [1] and record["share"] == 0.2 and record["replayed_records"] == 50
    (source,) = record["sources"]
    assert source["sha256"] == sha256_file(REPO / "data/stage1/train.jsonl")
    assert source["ids"] == [r.id for r in replayed] and source["train_file"] == "data/stage1/train.jsonl"

    both, record = mixed(lineage_dirs, 0.2, "all")
    by_stage = Counter(r.id.split("-")[0] for r in both.records[200:])
    assert set(by_stage) == {"stage1", "stage2"} and sum(by_stage.values()) == 50
    assert [e["records"] for e in record["sources"]] == [by_stage["stage1"], by_stage["stage2"]]
    # reproducible: the same seed mixes the same records in; another seed others
    assert [r.id for r in mixed(lineage_dirs, 0.2, "all")[0].records] == [r.id for r in both.records]
    assert [r.id for r in mixed(lineage_dirs, 0.2, "all", seed=7)[0].records] != [r.id for r in both.records]
    assert forgetting.replay_records(ReplaySettings(fraction=0.0), 42, 200, (), None) is None


def test_replay_refuses_a_file_that_changed_since_its_stage_trained_on_it(lineage_dirs):
    chain = read_lineage(lineage_dirs / "stage2")
    chain[0].train_file["sha256"] = "another sha256"  # as if the file had changed since stage 1 recorded it
    with pytest.raises(ConfigError, match="stage 1's train_file data/stage1/train.jsonl changed since stage 1"):
        forgetting.replay_records(ReplaySettings(fraction=0.2, stages=[1]), 42, 10, chain,
                                  lambda path, name, stage: FakeSplit("x", 10))


def test_an_earlier_stages_split_is_read_with_that_stages_columns_and_question_type(tmp_path):
    import yaml

    cfg = StageConfig(output_dir=str(tmp_path / "stage2"), train_file="t", system_prompt="Be brief.",
                      columns=DataColumns(id="questionId"))
    earlier = tmp_path / "stage1"
    earlier.mkdir()
    (earlier / RESOLVED_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(StageConfig(
        output_dir=str(earlier), train_file="t", system_prompt="Other.", question_type="free_text",
        columns=DataColumns(question="query", references="label")))))
    read = tq.as_read_by(cfg, earlier)
    assert (read.columns, read.question_type) == (DataColumns(question="query", references="label"), "free_text")
    assert read.system_prompt == "Be brief." and read.output_dir == cfg.output_dir  # this stage's prompt and cache
    assert tq.as_read_by(cfg, tmp_path / "gone") is cfg  # a stage without a readable config: this stage's own


def test_the_verifier_check_of_a_replay_record(lineage_dirs):
    chain = read_lineage(lineage_dirs / "stage2")
    _, record = mixed(lineage_dirs, 0.2, "all")
    assert forgetting.replay_problems(record, chain) == []
    record["sources"][0]["sha256"] = "f" * 64  # records from another file than the one stage 1 trained on
    assert "are not the data stage 1 trained on" in forgetting.replay_problems(record, chain)[0]
    record["sources"][0]["stage"] = 7
    assert "replayed stage 7 is not in the lineage (stages 1, 2)" in forgetting.replay_problems(record, chain)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Which dev splits a stage watches: each earlier stage's own, as that stage recorded it
# ---------------------------------------------------------------------------------------------------------------------


def test_earlier_dev_splits_loads_the_split_each_earlier_stage_recorded(lineage_dirs):
    chain = read_lineage(lineage_dirs / "stage3")  # the lineage of a stage 4
    loaded = []
    splits = forgetting.earlier_dev_splits(
        chain, lambda path, name, stage: loaded.append((path, name, stage.stage)) or f"split {path}")
    assert {name: (stage.stage, split) for name, (stage, split) in splits.items()} == {
        f"stage{k}": (k, f"split {REPO / f'data/stage{k}/dev.jsonl'}") for k in (1, 2, 3)}
    # each split read for (with the settings of) the stage that recorded it
    assert loaded == [(str(REPO / f"data/stage{k}/dev.jsonl"), f"stage {k} dev", k) for k in (1, 2, 3)]


def write_split(path: Path, prefix: str, n: int = 2) -> Path:
    """A split of `n` numeric questions on one small image beside it, ids `<prefix>-0`, ..."""
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 30, 200)).save(path.parent / "blue.png")
    path.write_text("".join(json.dumps({"id": f"{prefix}-{i}", "image": "blue.png", "question": "How many?",
                                        "type": "numeric", "answer": i}) + "\n" for i in range(n)))
    return path


def ids(split) -> list[str]:
    return [r.id for r in split.records]


def test_a_stage_watches_each_earlier_stage_on_the_dev_split_it_recorded(tmp_path, processor_without_model):
    """load_stage_data of a stage 3 on stages 1 and 2 written by hand, with dev splits of their own (each a few
    questions, so that the processor alone tokenises them in the fast tier): it watches stage 1's and stage 2's, not
    its own; and its own dev split stays its eval split."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    dev = {k: write_split(data_dir / f"stage{k}_dev.jsonl", f"s{k}-dev") for k in (1, 2, 3)}
    stage1 = fake_stage(tmp_path / "stage1", 1, None, eval_file=str(dev[1]))
    stage2 = fake_stage(tmp_path / "stage2", 2, stage1, eval_file=str(dev[2]))
    cfg = StageConfig(output_dir=str(tmp_path / "stage3"), train_file=str(write_split(data_dir / "train.jsonl",
                                                                                      "s3-train")),
                      eval_file=str(dev[3]), stage=3, prev_checkpoint=str(stage2), batch_size=2,
                      cache_image_checks=False)
    data = tq.load_stage_data(cfg, resolve_lineage(cfg.prev_checkpoint), processor_without_model)
    watched = {name: (stage.stage, ids(split)) for name, (stage, split) in data.earlier_splits.items()}
    assert watched == {"stage1": (1, ["s1-dev-0", "s1-dev-1"]), "stage2": (2, ["s2-dev-0", "s2-dev-1"])}
    assert ids(data.eval) == ["s3-dev-0", "s3-dev-1"] and ids(data.train) == ["s3-train-0", "s3-train-1"]
    assert data.continuity_file == str(dev[2]) and ids(data.continuity) == ["s2-dev-0", "s2-dev-1"]
    cfg.watch_earlier_stages = False
    assert tq.load_stage_data(cfg, resolve_lineage(cfg.prev_checkpoint), processor_without_model).earlier_splits == {}


# ---------------------------------------------------------------------------------------------------------------------
# (d) config validation names the key, before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def validation_errors(**settings) -> str:
    cfg = StageConfig(**{"output_dir": "unused/out", "train_file": "data/stage1/train.jsonl", "batch_size": 2,
                         "tensorboard": False, **settings})
    with pytest.raises(ConfigError) as err:
        tq.validate_config(cfg)
    return str(err.value)


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_replay_fraction_outside_0_1_is_refused(fraction, lineage_dirs):
    text = validation_errors(stage=4, prev_checkpoint=str(lineage_dirs / "stage3"),
                             replay=ReplaySettings(fraction=fraction))
    assert f"replay.fraction must be in [0, 1) (the share of replayed records in the mixed training set; 0 is off), " \
           f"got {fraction}" in text


@pytest.mark.parametrize("tolerance", [0.0, -0.1])
def test_forgetting_tolerance_must_be_positive(tolerance, lineage_dirs):
    text = validation_errors(stage=4, prev_checkpoint=str(lineage_dirs / "stage3"), forgetting_tolerance=tolerance)
    assert f"forgetting_tolerance must be > 0 (a relative rise: 0.1 stops or warns at 10% above the loss before the " \
           f"first step), or null for off; got {tolerance}" in text


def test_replay_and_tolerance_need_earlier_stages():
    text = validation_errors(replay=ReplaySettings(fraction=0.2), forgetting_tolerance=0.1)
    assert "replay.fraction: stage 1 has no prev_checkpoint, so no earlier stage whose training records it could " \
           "replay" in text
    assert "forgetting_tolerance: stage 1 has no prev_checkpoint, so no earlier stage to watch" in text
    text = validation_errors(forgetting_action="stop")
    assert "forgetting_action: stop needs forgetting_tolerance" in text


def test_replay_stages_must_be_in_the_lineage(lineage_dirs):
    text = validation_errors(stage=4, prev_checkpoint=str(lineage_dirs / "stage3"),
                             replay=ReplaySettings(fraction=0.2, stages=[1, 5]))
    assert "replay.stages: stage 5 is not in this stage's lineage (through prev_checkpoint: stages 1, 2, 3)" in text
    assert "stage 1 is not in" not in text
    # a replayed file that changed since, or is gone, is named too
    metrics_file = lineage_dirs / "stage2" / STAGE_METRICS
    m = json.loads(metrics_file.read_text())
    m["data_files"]["train_file"]["sha256"] = "0" * 64
    metrics_file.write_text(json.dumps(m))
    (lineage_dirs / "stage3" / STAGE_METRICS).write_text(metrics_file.read_text().replace(
        '"stage": 2', '"stage": 3').replace("data/stage2/train.jsonl", "data/gone.jsonl").replace(
        str(lineage_dirs / "stage1"), str(lineage_dirs / "stage2")))
    text = validation_errors(stage=4, prev_checkpoint=str(lineage_dirs / "stage3"),
                             replay=ReplaySettings(fraction=0.2))
    assert "replay: stage 2's train_file data/stage2/train.jsonl changed since stage 2 trained on it" in text
    assert "replay: stage 3's train_file data/gone.jsonl is not found" in text


def test_replay_keys_are_typed_and_unknown_ones_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: o\ntrain_file: t\nreplay: {fraction: 0.2, from: all}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'replay\.from'"):
        load_config(config)
    config.write_text("output_dir: o\ntrain_file: t\nreplay: {fraction: 0.2, stages: some}\n")
    with pytest.raises(ConfigError, match=r"replay\.stages: 'some' is not one of 'all'"):
        load_config(config)
    config.write_text("output_dir: o\ntrain_file: t\nforgetting_action: halt\n")
    with pytest.raises(ConfigError, match=r"forgetting_action: 'halt' is not one of 'warn', 'stop'"):
        load_config(config)
    assert load_config(config.with_name("c.yaml"), ["forgetting_action=stop", "replay.stages=[1, 2]"]).replay == \
        ReplaySettings(fraction=0.0, stages=[1, 2])


def test_the_cli_reports_every_problem_before_the_model_loads(tmp_path):
    result = run_script("train_qlora_qwen3vl.py", "configs/demo/stage1.yaml", "--set", f"output_dir={tmp_path / 'o'}",
                        "--set", "replay.fraction=1.2", "--set", "forgetting_tolerance=0")
    assert result.returncode == 2
    assert "replay.fraction must be in [0, 1)" in result.stderr and "forgetting_tolerance must be > 0" in result.stderr
    assert "Loaded 4-bit" not in result.stdout and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The watch's decision, and the reports
# ---------------------------------------------------------------------------------------------------------------------


def watch_of(tolerance, action: str) -> forgetting.EarlierStagesWatch:
    stage = RecordedStage(1, Path("s1"), {})
    cfg = types.SimpleNamespace(forgetting_tolerance=tolerance, forgetting_action=action, eval_steps=10)
    watch = forgetting.EarlierStagesWatch({"stage1": (stage, None)}, cfg, Path("w"), resumed=False)
    watch.start = {"stage1": 2.0}
    return watch


def test_the_tolerance_is_a_rise_relative_to_the_loss_before_the_first_step():
    warn = watch_of(0.1, "warn")
    assert not warn.check(10, {"stage1": 2.1}) and warn.exceeded == []  # 5%: within
    assert not warn.check(20, {"stage1": 2.3}) and warn.stopped_at is None  # 15%: warned, goes on
    assert warn.exceeded == [{"step": 20, "stage": 1, "loss": 2.3, "loss_at_start": 2.0, "rise": 0.15}]
    stop = watch_of(0.1, "stop")
    assert not stop.check(10, {"stage1": 1.0}) and stop.check(20, {"stage1": 2.3}) and stop.stopped_at == 20
    assert not watch_of(None, "warn").check(10, {"stage1": 100.0})  # off


def test_dev_split_series_follow_each_split_across_stages():
    d1, d2 = "/d/stage1/dev.jsonl", "/d/stage2/dev.jsonl"
    chain = [{"stage": 1, "global_steps": 10, "final_eval_file": d1, "first_eval_file": d1, "first_eval_loss": 12.0,
              "first_eval_loss_own_split": 12.0, "eval_loss_history": [{"step": 5, "loss": 10.0}],
              "final_eval_loss": 9.0},
             {"stage": 2, "global_steps": 6, "final_eval_file": d2, "first_eval_file": d1, "first_eval_loss": 9.0,
              "first_eval_loss_own_split": 11.0, "eval_loss_history": [], "final_eval_loss": 8.0,
              "earlier_stages": [{"stage": 1, "eval_file": d1, "loss_at_start": 9.0,
                                  "loss_history": [{"step": 3, "loss": 9.5}], "final_loss": 9.7}]}]
    assert plots.dev_split_series(chain) == {"stage 1 dev": [(0, 12.0), (5, 10.0), (10, 9.0), (13, 9.5),
                                                                  (16, 9.7)],
                                                  "stage 2 dev": [(10, 11.0), (16, 8.0)]}


# ---------------------------------------------------------------------------------------------------------------------
# On the tiny model, through the CLI
# ---------------------------------------------------------------------------------------------------------------------

REL = 1e-4  # the same weights on the same split, evaluated twice: equal to float rounding


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * abs(b)


def type_counts(path: str) -> dict:
    return dict(Counter(json.loads(line)["type"] for line in Path(path).read_text().splitlines()))


def assert_watched_their_own_splits(root: Path) -> None:
    """Stages 2 and 3 evaluated the dev split of each earlier stage, not their own: the split each earlier stage
    recorded; the loss there equal to an independent measure on it with the same weights (the continuity measure
    on the previous stage's split; for stage 1's split in stage 3, stage 2's own watch at its end), and not the
    loss on the current split; the answers' question types those of that split's file."""
    m1, m2, m3 = (metrics(root / f"stage{k}") for k in (1, 2, 3))
    assert [e["stage"] for e in m2["earlier_stages"]] == [1] and [e["stage"] for e in m3["earlier_stages"]] == [1, 2]
    for m in (m2, m3):
        for e in m["earlier_stages"]:
            assert e["eval_file"] == metrics(root / f"stage{e['stage']}")["final_eval_file"] != m["final_eval_file"]
            counts = {k: v["n"] for k, v in e["dev_metrics"].items() if k != "overall"}
            assert counts == type_counts(e["eval_file"]) != type_counts(m["final_eval_file"]), e["stage"]
            assert not close(e["loss_at_start"], m["first_eval_loss_own_split"]), "the current split's loss"
    (w2_1,), (w3_1, w3_2) = m2["earlier_stages"], m3["earlier_stages"]
    assert close(w2_1["loss_at_start"], m2["first_eval_loss"])  # stage 1's split, measured by continuity too
    assert close(w3_2["loss_at_start"], m3["first_eval_loss"]) and close(w3_2["loss_at_start"], m2["final_eval_loss"])
    assert close(w3_1["loss_at_start"], w2_1["final_loss"])  # stage 2's end = stage 3's start, on stage 1's split
    assert w2_1["loss_at_start"] == m1["final_eval_loss"] or close(w2_1["loss_at_start"], m1["final_eval_loss"])


def test_earlier_stages_are_watched_on_their_own_dev_splits(curriculum):
    root, logs = curriculum
    assert_watched_their_own_splits(root)
    assert metrics(root / "stage1")["earlier_stages"] == [] and "earlier stages" not in logs[1]
    assert "earlier stages before the first step | stage 1 dev loss " in logs[3]
    assert "Dev accuracy on stage 2's dev split (40 questions, by generation): " in logs[3]
    card = (root / "stage3" / "README.md").read_text()
    assert "## Earlier stages" in card and f"| 1 | `{metrics(root / 'stage1')['final_eval_file']}` |" in card


def stage2_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [*stage_args(2, root, str(out), None), "--set", "eval_questions=0", "--set", "tensorboard=false",
            *extra]


def test_replay_stage_mixes_records_verifies_and_shows_them(curriculum, tmp_path):
    root, _ = curriculum
    out = tmp_path / "replay"
    result = run_script("train_qlora_qwen3vl.py", *stage2_args(root, out, "--set", "max_steps=3",
                                                               "--set", "replay.fraction=0.2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("Replay: 50 records of stage(s) 1 mixed into 200 of this stage's: 20.0% of 250 training records "
            "(stage 1: 50 of 200 from data/stage1/train.jsonl; seed 42)") in result.stdout
    m = metrics(out)
    assert m["train_samples"] == 250 and m["replay"]["share"] == 0.2 and m["replay"]["stages"] == [1]
    (source,) = m["replay"]["sources"]
    assert source["sha256"] == metrics(root / "stage1")["data_files"]["train_file"]["sha256"]
    stage1_ids = [json.loads(line)["id"] for line in (REPO / "data/stage1/train.jsonl").read_text().splitlines()]
    assert source["ids"] == [stage1_ids[i] for i in forgetting.choose_replay({1: 200}, 200, 0.2, seed=42)[1]]
    assert m["data_files"]["train_file"]["path"] == "data/stage2/train.jsonl"  # no new data source
    shutil.copytree(root / "stage1", tmp_path / "stage1")  # beside it, as a curriculum
    verified = run_script("verify_exp4_fix.py", str(out), "--skip-load")
    assert verified.returncode == 0, verified.stdout
    assert ("✓ replay: 50 of 250 training records (20.0%) replayed from stage 1 (50 of 200 from "
            "data/stage1/train.jsonl, sha256 ") in verified.stdout
    assert "✓ lineage: started from exactly" in verified.stdout
    m["replay"]["sources"][0]["sha256"] = "0" * 64  # records from elsewhere than stage 1's training data
    (out / STAGE_METRICS).write_text(json.dumps(m))
    failed = run_script("verify_exp4_fix.py", str(out), "--skip-load")
    assert failed.returncode == 1 and "✗ replay: the records replayed from stage 1" in failed.stdout


def test_forgetting_tolerance_stops_the_stage_keeping_its_checkpoint(curriculum, tmp_path):
    """Fault injection: from step 4 the earlier split's loss comes out 3 times higher. forgetting_action: stop
    ends the stage at that evaluation with exit 5, a checkpoint kept and the stage not saved; the same command with
    forgetting_action=warn resumes from the checkpoint, warns at each evaluation over the tolerance, and finishes."""
    root, _ = curriculum
    out = tmp_path / "stage2"
    args = stage2_args(root, out, "--set", "max_steps=8", "--set", "eval_steps=2", "--set", "forgetting_tolerance=0.5")
    stopped = run_script("tests/faults.py", "earlier-loss-jumps-at-step", "4", *args, "--set", "forgetting_action=stop")
    assert stopped.returncode == forgetting.FORGETTING_EXIT_CODE == 5, stopped.stderr[-3000:]
    assert "Stopped: forgetting: stage 1's dev loss rose " in stopped.stderr and " at step 4/8 (" in stopped.stderr
    partial = out.with_name("stage2.partial")
    assert f"its last checkpoint is {partial / 'checkpoint-4'}." in stopped.stderr
    assert "--set forgetting_action=warn" in stopped.stderr and "Traceback" not in stopped.stderr
    assert (partial / "checkpoint-4" / "trainer_state.json").is_file() and not out.exists()
    assert "earlier stages at step 2/8 | stage 1 dev loss " in stopped.stdout
    assert "WARNING: forgetting: stage 1's dev loss is " in stopped.stdout

    resumed = run_script("tests/faults.py", "earlier-loss-jumps-at-step", "4", *args)  # forgetting_action: warn
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming stage 2 from {partial / 'checkpoint-4'}" in resumed.stdout
    m = metrics(out)
    (watched,) = m["earlier_stages"]
    steps = [h["step"] for h in watched["loss_history"]]
    assert steps == [2, 4, 6, 8] and m["resumed_from_step"] == 4  # the history before the stop kept
    jumped = watched["loss_history"][1]["loss"]
    assert jumped > 1.5 * watched["loss_at_start"] and watched["loss_history"][0]["loss"] < 1.5 * watched[
        "loss_at_start"]
    assert [e["step"] for e in m["forgetting"]["exceeded"]] == [6, 8] and m["forgetting"]["action"] == "warn"
    assert resumed.stdout.count("WARNING: forgetting: stage 1's dev loss is ") == 2


def test_the_forgetting_matrix_has_a_table_per_question_type_with_intervals():
    import vqa_eval
    from curriculum import scoring

    def metrics(rows):
        return {k: v for k, v in scoring.compute_metrics(rows, 1.0).items() if k != "overall"}

    free = metrics([{"type": "free_text", "gold": ["blue"], "pred": "blue"},
                    {"type": "free_text", "gold": ["red"], "pred": "rod"}])
    choice = metrics([{"type": "single_choice", "gold": "A", "pred": "B"}])
    matrix = {"trained": ["base", 1], "evaluated": [1, 2], "n": {1: 2, 2: 1},
              "accuracy": {"base": {1: 0.5, 2: 0.0}, 1: {1: 0.5, 2: 0.0}},
              "by_type": {"base": {1: free, 2: choice}, 1: {1: free, 2: choice}}}
    table = vqa_eval.forgetting_markdown(matrix)
    assert "| after stage 1 | 50.0% | 0.0% |" in table  # the overall table, as before
    free_table = table[table.index("free_text (exact match, 95% interval):"):]
    assert "| base (no adapter) | 50.0% (9%–91%, n=2), ANLS 0.833 | – |" in free_table
    assert "single_choice (accuracy, 95% interval):" in table and "| – | 0.0% (0%–79%, n=1) |" in table
    assert "free_text" not in vqa_eval.forgetting_markdown({**matrix, "by_type": {}})  # a matrix from before
