"""A curriculum without forgetting: every earlier stage watched during a stage, and replay to keep it.

A stage >= 2 knows the stages before it from its lineage (curriculum/lineage.py: the prev_checkpoint chain, each
stage's stage_metrics.json naming the stage it continued). From each it takes two things:

- its dev split (the `final_eval_file` it recorded): evaluated before the first step, at every evaluation during
  the stage and at the end, through the Trainer's own evaluation (`eval_dataset={"stage1": ..., ...}`, reported as
  `eval_stage1_loss`, ...), and answered by generation at the end. `forgetting_tolerance` warns, or stops the
  stage, when one of these losses rises too far above its value before this stage's first step.
- its training records (the `train_file` it recorded, by path and SHA-256), for `replay`: a seeded share of them
  mixed into this stage's training set.

The recipe passes in how it loads a split (as the earlier stage read it) and how the Trainer evaluates, so nothing
here imports it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curriculum.config import ReplaySettings, StageConfig
from curriculum.data_files import split_sha256
from curriculum.errors import ConfigError, StageStopped
from curriculum.faults import complete_checkpoints
from curriculum.lineage import Lineage, RecordedStage
from curriculum.processes import is_main_process, print_main
from curriculum.records import QUESTION_TYPES

FORGETTING_EXIT_CODE = 5  # forgetting_action: stop (130/143 are the stop signals, 1-4 the errors)
START_FILE = "earlier_stages_start.json"  # in <output_dir>.partial: the losses a resumed run must not re-measure


def unique_names(chain: tuple[RecordedStage, ...]) -> dict[str, RecordedStage]:
    """{metric name: stage}; a stage number seen twice (a stage 1 that continued an adapter trained elsewhere)
    gets its position appended, so that no two splits share a metric key."""
    named: dict[str, RecordedStage] = {}
    for i, stage in enumerate(chain):
        named[stage.name if stage.name not in named else f"{stage.name}_{i}"] = stage
    return named


# ---------------------------------------------------------------------------------------------------------------------
# Config: what validate_config adds for replay, from the lineage
# ---------------------------------------------------------------------------------------------------------------------


def replay_sources(stages: str | list[int], chain: tuple[RecordedStage, ...]) -> list[RecordedStage]:
    """The stages whose training records `replay.stages` names: all of the lineage, or those numbered."""
    return list(chain) if stages == "all" else [s for s in chain if s.stage in stages]


def replay_source_problems(replay: ReplaySettings, stage: int, lineage: Lineage) -> list[str]:
    """With replay on (validate_config asks only then): the stages `replay.stages` names are in this stage's
    lineage, and each recorded the file it trained on, which is still there with the same SHA-256. One line each
    naming the key; found before the model loads. (The keys' own values: ReplaySettings.problems.)"""
    if not lineage.continues:
        return [f"replay.fraction: stage {stage} has no prev_checkpoint, so no earlier stage whose training records it "
                "could replay; set replay.fraction: 0"]
    if not lineage.chain:
        return [f"replay: prev_checkpoint {lineage.prev_checkpoint} records no stage_metrics.json, so its training "
                "records are unknown; set replay.fraction: 0"]
    problems, numbers = [], [s.stage for s in lineage.chain]
    if isinstance(replay.stages, list):
        problems += [f"replay.stages: stage {n} is not in this stage's lineage (through prev_checkpoint: stages "
                     f"{', '.join(map(str, numbers))})" for n in replay.stages if n not in numbers]
    for source in replay_sources(replay.stages, lineage.chain):
        recorded = source.train_file
        if not recorded:
            problems.append(f"replay: stage {source.stage} ({source.dir}) recorded no train_file in its "
                            "stage_metrics.json")
        elif not Path(recorded["path"]).exists():
            problems.append(f"replay: stage {source.stage}'s train_file {recorded['path']} is not found (the path "
                            "it recorded, relative to where you run the command)")
        elif split_sha256(recorded["path"]) != recorded["sha256"]:
            problems.append(f"replay: stage {source.stage}'s train_file {recorded['path']} changed since stage "
                            f"{source.stage} trained on it (sha256 {recorded['sha256'][:12]}... recorded, "
                            f"{split_sha256(recorded['path'])[:12]}... now)")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Replay: a seeded share of earlier stages' training records, mixed into this stage's
# ---------------------------------------------------------------------------------------------------------------------


def replay_count(n_own: int, fraction: float) -> int:
    """Replayed records that make `fraction` of the mixed set: n / (n_own + n) = fraction."""
    return round(fraction / (1 - fraction) * n_own)


def choose_replay(pools: dict[int, int], n_own: int, fraction: float, seed: int) -> dict[int, list[int]]:
    """{stage: indices of its records to replay}. `pools` holds each source stage's record count. The records are
    drawn without replacement from the pool of all of them (each stage contributes in proportion to its size),
    seeded: the same seed draws the same records. At most the whole pool."""
    flat = [(stage, i) for stage, size in pools.items() for i in range(size)]
    picked = random.Random(seed).sample(flat, min(replay_count(n_own, fraction), len(flat)))
    return {stage: sorted(i for s, i in picked if s == stage) for stage in pools}


@dataclass(frozen=True)
class Replayed:
    """Earlier stages' training records drawn for this stage, to be appended to its own."""
    records: list  # the Records, in the order they are appended
    lengths: list[int] | None  # their lengths in tokens (None where a source split was not measured)
    record: dict  # what was replayed, for stage_metrics.json: which stages, how many records, their files' SHA-256


def replay_records(replay: ReplaySettings, seed: int, n_own: int, chain: tuple[RecordedStage, ...],
                   load_train: Callable[[str, str, RecordedStage], Any]) -> Replayed | None:
    """The records `replay` draws (seeded by `seed`) to go with this stage's `n_own`, from the training splits of
    the stages it names (datasets with `.records` and `.lengths`, as `load_train(path, split_name, stage)` returns
    them, reading the file as that stage did); None when replay is off. The Trainer shuffles the mixed set
    (data_seed)."""
    if not replay.fraction:
        return None
    sources = replay_sources(replay.stages, chain)
    loaded = {s.stage: load_train(s.train_file["path"], f"stage {s.stage} train (replay)", s) for s in sources}
    picks = choose_replay({stage: len(ds) for stage, ds in loaded.items()}, n_own, replay.fraction, seed)
    records, lengths, entries = [], [], []
    for source in sources:
        ds, chosen = loaded[source.stage], picks[source.stage]
        sha = split_sha256(source.train_file["path"])
        if sha != source.train_file["sha256"]:  # validate_config checked it; the file changed since
            raise ConfigError(f"replay: stage {source.stage}'s train_file {source.train_file['path']} changed since "
                              f"stage {source.stage} trained on it")
        records += [ds.records[i] for i in chosen]
        lengths = None if lengths is None or ds.lengths is None else lengths + [ds.lengths[i] for i in chosen]
        entries.append({"stage": source.stage, "stage_dir": str(source.dir), "train_file": source.train_file["path"],
                        "sha256": sha, "pool": len(ds), "records": len(chosen),
                        "ids": [ds.records[i].id for i in chosen]})
    n = sum(e["records"] for e in entries)
    if n < replay_count(n_own, replay.fraction):
        print_main(f"Replay: the earlier stages hold {n} records, fewer than the "
                   f"{replay_count(n_own, replay.fraction)} that replay.fraction {replay.fraction:g} asks for; all of "
                   "them are replayed")
    print_main(f"Replay: {n} records of stage(s) {', '.join(str(e['stage']) for e in entries)} mixed into {n_own} of "
               f"this stage's: {n / (n_own + n):.1%} of {n_own + n} training records ("
               + ", ".join(f"stage {e['stage']}: {e['records']} of {e['pool']} from {e['train_file']}" for e in entries)
               + f"; seed {seed})")
    return Replayed(records, lengths, {
        "fraction": replay.fraction, "stages": [e["stage"] for e in entries], "seed": seed, "own_records": n_own,
        "replayed_records": n, "share": round(n / (n_own + n), 4), "sources": entries})


def replay_problems(record: dict, chain: tuple[RecordedStage, ...]) -> list[str]:
    """For the verifier: why a stage's replay record does not hold up, none if it does. Every replayed stage is
    in the lineage, and the records came from the very file (by SHA-256) that stage recorded training on: replay
    brings in no new data."""
    by_number = {s.stage: s for s in chain}
    problems = []
    for entry in record.get("sources") or []:
        source = by_number.get(entry.get("stage"))
        if source is None:
            problems.append(f"replayed stage {entry.get('stage')} is not in the lineage (stages "
                            f"{', '.join(str(s.stage) for s in chain) or 'none found'})")
        elif (source.train_file or {}).get("sha256") != entry.get("sha256"):
            problems.append(f"the records replayed from stage {entry['stage']} ({entry.get('train_file')}, sha256 "
                            f"{str(entry.get('sha256'))[:12]}...) are not the data stage {entry['stage']} trained on "
                            f"(sha256 {str((source.train_file or {}).get('sha256'))[:12]}...)")
    if not record.get("sources"):
        problems.append("replay is recorded, but no source stage")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Watching the earlier stages' dev splits during the stage
# ---------------------------------------------------------------------------------------------------------------------


def earlier_dev_splits(chain: tuple[RecordedStage, ...],
                       load_eval: Callable[[str, str, RecordedStage], Any]) -> dict[str, tuple]:
    """{metric name: (stage, its dev split loaded by `load_eval(path, split_name, stage)`, as that stage read it)} for
    every earlier stage that recorded one that is still there."""
    splits = {}
    for name, stage in unique_names(chain).items():
        if not stage.eval_file:
            print_main(f"Stage {stage.stage} ({stage.dir}) recorded no dev split: it is not watched")
        elif not Path(stage.eval_file).exists():
            print_main(f"WARNING: stage {stage.stage}'s dev split {stage.eval_file} is not found: it is not watched")
        else:
            splits[name] = (stage, load_eval(stage.eval_file, f"stage {stage.stage} dev", stage))
    return splits


def relative_rise(loss: float, start: float) -> float:
    """How far `loss` is above `start`, as a fraction of it (negative when below)."""
    return (loss - start) / start if start else 0.0 if loss == start else math.inf


class EarlierStagesWatch:
    """The earlier stages' dev losses during the stage: measured before the first step, at every evaluation (with
    the stage's own, every eval_steps) and at the end; held against forgetting_tolerance.

    The losses come from the Trainer's own evaluate (`evaluate`, passed to each method that measures, by the
    Trainer's callback step.WatchEarlierStages and by the recipe's fit): a dict of datasets as `eval_dataset` gives
    `<prefix>_<name>_loss`, logged (console, TensorBoard as eval/<name>_loss) and kept in the Trainer's log history,
    which a resumed run restores."""

    def __init__(self, splits: dict[str, tuple], cfg: StageConfig, work_dir: Path, resumed: bool):
        self.splits, self.work_dir, self.resumed = splits, Path(work_dir), resumed
        self.tolerance, self.action, self.eval_steps = cfg.forgetting_tolerance, cfg.forgetting_action, cfg.eval_steps
        self.start: dict[str, float] = {}  # loss before this stage's first step
        self.last: tuple[int, dict[str, float]] | None = None  # (step, losses) of the latest measure
        self.final: dict[str, float] = {}
        self.exceeded: list[dict] = []  # every time a loss rose past the tolerance
        self.stopped_at: int | None = None
        self.dev_metrics: dict[str, dict] = {}

    def measure(self, prefix: str, evaluate: Callable[..., dict]) -> dict[str, float]:
        """The loss on each earlier dev split, by the Trainer's evaluation of a dict of datasets. The RNG is left as
        it was, so watching does not change what trains (the eval dataloaders draw their seeds from it)."""
        if not self.splits:
            return {}
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate(eval_dataset={name: ds for name, (_, ds) in self.splits.items()},
                               metric_key_prefix=prefix)
        return {name: metrics[f"{prefix}_{name}_loss"] for name in self.splits}

    def describe(self, step: int, max_steps: int, losses: dict[str, float]) -> str:
        return f"earlier stages at step {step}/{max_steps} | " + " | ".join(
            f"stage {self.splits[n][0].stage} dev loss {loss:.4f} ({relative_rise(loss, self.start[n]):+.1%})"
            for n, loss in losses.items())

    def check(self, step: int, losses: dict[str, float]) -> bool:
        """Hold `losses` against the tolerance: warn for each over it; True when the stage is to stop."""
        if self.tolerance is None:
            return False
        over = []
        for name, loss in losses.items():
            rise = relative_rise(loss, self.start[name])
            if rise > self.tolerance:
                stage = self.splits[name][0].stage
                over.append({"step": step, "stage": stage, "loss": loss, "loss_at_start": self.start[name],
                             "rise": round(rise, 6)})
                print_main(f"WARNING: forgetting: stage {stage}'s dev loss is {loss:.4f} at step {step}, {rise:.1%} "
                           f"above its {self.start[name]:.4f} before this stage's first step (forgetting_tolerance "
                           f"{self.tolerance:g}, forgetting_action: {self.action})")
        self.exceeded += over
        if over and self.action == "stop" and self.stopped_at is None:
            self.stopped_at = step
        return bool(over) and self.action == "stop"

    def before_first_step(self, evaluate: Callable[..., dict]) -> None:
        """The losses before this stage's first step (a resumed run reads the interrupted run's), saved for a
        resumed run. Run once the Trainer has wrapped the model for training (step.MeasureBeforeFirstStep says why)."""
        if not self.splits:
            return
        saved = self.work_dir / START_FILE
        if self.resumed and saved.is_file():
            self.start = json.loads(saved.read_text())
            return
        self.start = self.measure("first_eval", evaluate)
        print_main("earlier stages before the first step | " + " | ".join(
            f"stage {self.splits[n][0].stage} dev loss {loss:.4f}" for n, loss in self.start.items()))
        if is_main_process():
            self.work_dir.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(self.start))

    def at_evaluation(self, state, control, evaluate: Callable[..., dict]) -> None:
        """Measure, say, hold against the tolerance; over it with forgetting_action: stop, the Trainer saves a
        checkpoint and stops, as for a stop signal."""
        if not self.splits:
            return
        losses = self.measure("eval", evaluate)
        self.last = (state.global_step, losses)
        print_main(self.describe(state.global_step, state.max_steps, losses))
        if self.check(state.global_step, losses):
            control.should_save, control.should_training_stop = True, True

    def after_step(self, state, control, evaluate: Callable[..., dict]) -> None:
        """Measure at every eval_steps when the stage has no evaluation of its own to measure with (at_evaluation
        then runs with it), and at the last step when there is a tolerance, where a stop still saves."""
        if control.should_evaluate:  # the stage's own evaluation comes next: at_evaluation measures then
            return
        due = self.eval_steps and state.global_step % self.eval_steps == 0  # (no own eval_file)
        last = self.tolerance is not None and state.global_step >= state.max_steps
        if due or last:
            self.at_evaluation(state, control, evaluate)

    def end(self, state, work_dir: Path, evaluate: Callable[..., dict]) -> None:
        """After training: the losses at the end (those of the last step if measured there), held against the
        tolerance unless they just were; raises StageStopped (exit FORGETTING_EXIT_CODE) if the stage stopped."""
        if not self.splits:  # stage 1, or watch_earlier_stages: false
            return
        if self.last is not None and self.last[0] == state.global_step:
            self.final = self.last[1]
        else:  # not measured at the last step, or a run resumed from a checkpoint at the last step
            self.final = self.measure("final_eval", evaluate)
            print_main(self.describe(state.global_step, state.max_steps, self.final))
            self.check(state.global_step, self.final)
        if self.stopped_at is None:
            return
        done = complete_checkpoints(work_dir)
        worst = max((e for e in self.exceeded if e["step"] == self.stopped_at), key=lambda e: e["rise"])
        raise StageStopped(
            f"forgetting: stage {worst['stage']}'s dev loss rose {worst['rise']:.1%} at step {self.stopped_at}/"
            f"{state.max_steps} ({worst['loss_at_start']:.4f} before this stage's first step, {worst['loss']:.4f} "
            f"now), over forgetting_tolerance {self.tolerance:g}. The stage was not saved; "
            + (f"its last checkpoint is {done[-1]}. " if done else "no checkpoint could be saved. ")
            + f"To keep what stage {worst['stage']} learned, train this stage again with replay (replay.fraction, "
            f"e.g. 0.2) or a lower lr: delete {work_dir} and run with the change. To accept the rise, run the same "
            "command with --set forgetting_action=warn (or a higher forgetting_tolerance): it resumes from the "
            "checkpoint.", FORGETTING_EXIT_CODE)

    def answer(self, score: Callable[[list], dict], eval_questions: int) -> None:
        """Answers by generation on each earlier dev split: `score(records)` gives vqa_eval's metrics."""
        for name, (stage, ds) in self.splits.items():
            records = ds.records if eval_questions < 0 else ds.records[:eval_questions]
            self.dev_metrics[name] = metrics = score(records)
            by_type = ", ".join(f"{kind} {metrics[kind]['accuracy']:.1%} (n={metrics[kind]['n']})"
                                for kind in QUESTION_TYPES if kind in metrics)
            print_main(f"Dev accuracy on stage {stage.stage}'s dev split ({len(records)} questions, by generation): "
                       f"{metrics['overall']['accuracy']:.1%} overall; {by_type}")

    def records(self, log_history: list[dict]) -> list[dict]:
        """stage_metrics.json's `earlier_stages`: per earlier stage, its dev split, the loss before the first step,
        at each evaluation and at the end, and the answers' metrics."""
        return [{"stage": stage.stage, "name": name, "stage_dir": str(stage.dir), "eval_file": stage.eval_file,
                 "loss_at_start": self.start.get(name),
                 "loss_history": [{"step": e["step"], "loss": e[f"eval_{name}_loss"]}
                                  for e in log_history if f"eval_{name}_loss" in e],
                 "final_loss": self.final.get(name),
                 "change": round(relative_rise(self.final[name], self.start[name]), 6)
                 if name in self.final and name in self.start else None,
                 "dev_metrics": self.dev_metrics.get(name)}
                for name, (stage, _) in self.splits.items()]

    def summary(self) -> dict:
        """stage_metrics.json's `forgetting`: the tolerance, the action, and every time it was exceeded."""
        return {"tolerance": self.tolerance, "action": self.action, "exceeded": self.exceeded,
                "stopped_at_step": self.stopped_at}
