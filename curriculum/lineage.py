"""The stages a stage continues: its prev_checkpoint, the stage that one continued, and so on."""

from __future__ import annotations

from pathlib import Path

from curriculum.adapter_files import adapter_to_continue_problems
from curriculum.config import StageConfig


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
