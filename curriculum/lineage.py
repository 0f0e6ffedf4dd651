"""The stages a stage continues, resolved once into a Lineage: the previous stage's folder (its prev_checkpoint), its
record, the stages before it, oldest first, each with the files it trained and ended on, and the hash of the adapter
the stage starts from.

Each stage's stage_metrics.json names the stage it continued, so the chain is followed record by record. The recipe
resolves it once per stage (`resolve_lineage`, after validation) and hands it to what needs it (the data of earlier
stages, the proof of the adapter, the stage's own record, the model card); validate_config resolves it for replay's
checks; the verifier, from a saved stage's record (`saved_stage_lineage`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from curriculum.adapter_files import ADAPTER_WEIGHTS, adapter_to_continue_problems
from curriculum.config import StageConfig
from curriculum.hashing import sha256_file
from curriculum.processes import print_main
from curriculum.stage_folder import STAGE_METRICS


@dataclass(frozen=True)
class RecordedStage:
    """A finished stage as its stage_metrics.json recorded it."""
    stage: int
    dir: Path
    metrics: dict

    @property
    def name(self) -> str:
        """Its name in metric keys: `stage1` gives `eval_stage1_loss`."""
        return f"stage{self.stage}"

    @property
    def eval_file(self) -> str | None:
        """The dev split it ended on (resolved when it was recorded)."""
        return self.metrics.get("final_eval_file")

    @property
    def train_file(self) -> dict | None:
        """{"path", "sha256"} of the split it trained on."""
        return (self.metrics.get("data_files") or {}).get("train_file")


@dataclass(frozen=True)
class Lineage:
    """Where a stage comes from. Stage 1 (a new adapter): prev_checkpoint None, no chain."""
    prev_checkpoint: str | None  # the previous stage's folder as named: the config's prev_checkpoint, or what a saved
    # stage recorded
    folder: Path | None  # where that folder is now (None: not found)
    chain: tuple[RecordedStage, ...]  # the stages before this one, oldest first; the last is `folder`'s own (empty
    # when it holds no readable stage_metrics.json; cut where an earlier one does not read)
    adapter_file_sha256: str | None  # SHA-256 of `folder`'s adapter_model.safetensors: the adapter a stage continuing
    # it starts from

    @property
    def continues(self) -> bool:
        """A later stage: it reopens the previous stage's adapter."""
        return self.prev_checkpoint is not None

    @property
    def previous(self) -> RecordedStage | None:
        """The previous stage's record (None: stage 1, or a folder that records none)."""
        return self.chain[-1] if self.chain and self.chain[-1].dir == self.folder else None

    @property
    def previous_metrics(self) -> dict:
        """The previous stage's stage_metrics.json ({} without one)."""
        return self.previous.metrics if self.previous else {}


def previous_stage_dir(stage_dir: str | os.PathLike, recorded: str | None) -> Path | None:
    """Where the stage that `stage_dir` continued is now: the path it recorded, or else, for a curriculum moved as
    a whole, the folder of that name beside `stage_dir`. None when neither holds an adapter. (Whether it is the
    right adapter is for its SHA-256 to say.)"""
    if not recorded:
        return None
    for candidate in (Path(recorded), Path(stage_dir).parent / Path(recorded).name):
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    return None


def recorded_chain(first: Path | None) -> tuple[RecordedStage, ...]:
    """`first` and every stage before it, oldest first, by the prev_checkpoint each recorded (found as
    previous_stage_dir finds it), as long as each holds a readable stage_metrics.json. A record that does not read
    ends the chain there, with a warning: the stages before it stay unknown."""
    chain: list[RecordedStage] = []
    seen: set[Path] = set()
    current = first
    while current is not None and current.resolve() not in seen and (current / STAGE_METRICS).is_file():
        try:
            metrics = json.loads((current / STAGE_METRICS).read_text())
        except (OSError, ValueError) as err:
            print_main(f"WARNING: the stage record in {current} does not read ({err}); the lineage is followed no "
                       "further")
            break
        if not isinstance(metrics, dict):
            break
        seen.add(current.resolve())
        chain.append(RecordedStage(metrics.get("stage"), current, metrics))
        current = previous_stage_dir(current, metrics.get("prev_checkpoint"))
    return tuple(chain[::-1])


def lineage_from(prev_checkpoint: str | None, folder: Path | None) -> Lineage:
    adapter = folder / ADAPTER_WEIGHTS if folder is not None else None
    return Lineage(prev_checkpoint, folder, recorded_chain(folder),
                   sha256_file(adapter) if adapter is not None and adapter.is_file() else None)


def resolve_lineage(prev_checkpoint: str | None) -> Lineage:
    """A stage's lineage from its config's prev_checkpoint (validate_config checked the folder)."""
    return lineage_from(prev_checkpoint, Path(prev_checkpoint) if prev_checkpoint else None)


def saved_stage_lineage(stage_dir: Path, metrics: dict | None) -> Lineage:
    """A saved stage's lineage, from the prev_checkpoint its stage_metrics.json recorded: that folder, or the one of
    its name beside the stage (a curriculum moved as a whole)."""
    recorded = (metrics or {}).get("prev_checkpoint")
    return lineage_from(recorded, previous_stage_dir(stage_dir, recorded))


def prev_checkpoint_problems(cfg: StageConfig) -> list[str]:
    """stage, prev_checkpoint, continue_at_stage_1 and optimizer_state together, and the folder prev_checkpoint
    names as the adapter to continue (adapter_files.adapter_to_continue_problems), before any model loads."""
    problems = []
    if cfg.stage >= 2 and not cfg.prev_checkpoint:
        problems.append(f"stage {cfg.stage} needs prev_checkpoint: the adapter of stage {cfg.stage - 1} to continue")
    if cfg.stage == 1 and cfg.prev_checkpoint and not cfg.continue_at_stage_1:
        problems.append("stage 1 makes a new adapter: remove prev_checkpoint, set stage: 2 to continue it, or set "
                        "continue_at_stage_1: true to continue it as stage 1")
    if cfg.prev_checkpoint:
        problems += adapter_to_continue_problems(Path(cfg.prev_checkpoint), cfg.lora, cfg.optimizer_state)
        if Path(cfg.prev_checkpoint).resolve() == Path(cfg.output_dir).resolve():
            problems.append("output_dir must differ from prev_checkpoint: a stage never overwrites the one it "
                            "continues")
    elif cfg.optimizer_state == "resume":
        problems.append("optimizer_state: resume needs a prev_checkpoint to take the moments from")
    return problems
