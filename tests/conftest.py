import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The tiny random Qwen3-VL, built on first use through the trainer's own resolver."""
    import train_qlora_qwen3vl as tq

    return tq.resolve_model_path(tq.TINY_MODEL_NAME)


@pytest.fixture(scope="session")
def processor(tiny_model_path):
    import train_qlora_qwen3vl as tq

    cfg = tq.StageConfig(output_dir="unused", train_file="unused")
    return tq.load_processor(tiny_model_path, cfg)


def run_script(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script of the project as a user would, from the repo root; output captured for assertions."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
