"""A finished stage folder: the files that make it one, the finished stages under a curriculum's folder, and the
rename that puts a stage into place whole. What its stage_metrics.json and README say is curriculum/stage_record.py's,
how it finds the stages before it curriculum/lineage.py's, the adapter's own files curriculum/adapter_files.py's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from curriculum.config import StageConfig

STAGE_METRICS = "stage_metrics.json"  # written last by a finished stage: a folder holding it is a finished stage
RESOLVED_CONFIG = "resolved_config.yaml"


def output_dir_problems(cfg: StageConfig) -> list[str]:
    """output_dir holding a finished stage, unless overwrite allows replacing it."""
    out = Path(cfg.output_dir)
    if (out / STAGE_METRICS).is_file() and not cfg.overwrite:
        return [f"output_dir: {out} already holds a finished stage; choose another or set overwrite: true"]
    return []


def curriculum_stage_dirs(root: str | os.PathLike) -> list[Path]:
    """The finished stage directories under `root` (those with stage_metrics.json), in their recorded stage order."""
    stages = [p.parent for p in Path(root).glob(f"*/{STAGE_METRICS}")]
    return sorted(stages, key=lambda p: json.loads((p / STAGE_METRICS).read_text()).get("stage", 0))


def move_into_place(staging: Path, out: Path) -> None:
    """The complete stage in `staging` becomes `out`; an old stage there (overwrite: true) is moved aside, not
    deleted, until the new one is in."""
    if out.exists():
        replaced = Path(f"{out}.replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(staging, out)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, out)
