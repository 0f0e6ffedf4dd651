import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# The recipe first, as in a user's run: importing it sets how torch's CPU threads wait (before torch loads) and quiets
# the libraries' import-time warnings, for every test.
import train_qlora_qwen3vl  # noqa: E402, F401
from curriculum.base_model import TINY_MODEL_NAME, load_processor, resolve_model_path  # noqa: E402
from curriculum.config import StageConfig  # noqa: E402
from curriculum.stage_folder import STAGE_METRICS  # noqa: E402

# Test tiers: `python -m pytest -q -m "not slow"` runs the pure functions, config and metrics in about a minute; the
# slow tier loads the tiny model or runs the CLI (stages, faults, several processes). CI runs both.
SLOW_FIXTURES = {"tiny_model_path", "processor", "curriculum", "ddp_curriculum", "trained_adapter"}
SLOW_MODULES = {"test_curriculum", "test_faults", "test_processes", "test_damaged_stage", "test_eval_e2e",
                "test_hub_schemas"}


def pytest_configure(config):
    """The tiny model is built once, before any test runs: in the one process, or in pytest-xdist's controller
    before its workers start (two workers building it at once would each replace the other's folder)."""
    if not hasattr(config, "workerinput"):
        from curriculum.base_model import TINY_MODEL_NAME, resolve_model_path

        resolve_model_path(TINY_MODEL_NAME)


# Under pytest-xdist (`-n 2 --dist loadgroup`), the tests that share a trained fixture run on one worker, so that it
# is trained once: the session's `curriculum` (about 100 s) for every test that uses it, else a module's own.
MODULES_WITH_A_TRAINED_FIXTURE = {"test_export", "test_faults", "test_hub_schemas", "test_processes"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Marks the slow tier and the xdist groups. First among the hooks: xdist's own turns the xdist_group markers
    into node ids (`...@curriculum`), and ran before this one without `tryfirst`: no test had a group, each worker
    trained its own copy of a shared fixture, and two workers could launch two-process runs at once."""
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if "curriculum" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("curriculum"))
        elif item.module.__name__ in MODULES_WITH_A_TRAINED_FIXTURE:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """The tiny random Qwen3-VL, built on first use through the trainer's own resolver."""
    return resolve_model_path(TINY_MODEL_NAME)


@pytest.fixture(scope="session")
def processor(tiny_model_path):
    cfg = StageConfig(output_dir="unused", train_file="unused")
    return load_processor(tiny_model_path, cfg)


@pytest.fixture(scope="session")
def processor_without_model():
    """The tiny model's processor (tokenizer, chat template, image processor) for the fast tier: no model is loaded.
    Its folder is built through the trainer's resolver like `tiny_model_path`'s: the random weights cost no
    measurable time beside the processor files (about 4 s either way, mostly the tokenizer), and later runs find the
    folder built."""
    cfg = StageConfig(output_dir="unused", train_file="unused")
    return load_processor(resolve_model_path(TINY_MODEL_NAME), cfg)


def run_script(*args: str, cwd: Path = REPO, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script of the project as a user would, from the repo root; output captured for assertions."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
                          check=False)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600, log: Path | None = None) -> None:
    """Poll until `predicate()` holds, while the run `proc` is still going (a fault is injected next). If it ends
    first or the time runs out, the run is killed (its process group, if it leads one) and the assertion shows the
    end of its `log`."""
    deadline = time.time() + timeout
    while not predicate():
        problem = ("the run ended before the fault could be injected" if proc.poll() is not None
                   else f"timed out after {timeout:.0f} s waiting for the run" if time.time() >= deadline else None)
        if problem:
            if proc.poll() is None:
                leads_group = os.getpgid(proc.pid) == proc.pid
                os.killpg(proc.pid, signal.SIGKILL) if leads_group else proc.kill()
                proc.wait()
            tail = log.read_text()[-3000:] if log and log.is_file() else "(no log)"
            raise AssertionError(f"{problem}; the end of its log:\n{tail}")
        time.sleep(0.2)


CONTINUITY_TOLERANCE = 0.10
STEPS = 15


def stage_args(stage: int, root: Path, out: str | None = None, prev: str | None = None, *extra: str) -> list[str]:
    args = [f"configs/demo/stage{stage}.yaml", "--set", f"output_dir={root / (out or f'stage{stage}')}",
            "--set", f"max_steps={STEPS}", "--set", "logging_steps=5"]
    if stage > 1:
        args += ["--set", f"prev_checkpoint={root / (prev or f'stage{stage - 1}')}"]
    return args + list(extra)


def run_stage(*args: str) -> str:
    """A stage through the CLI; returns what it printed, stdout then stderr (where warnings go)."""
    result = run_script("train_qlora_qwen3vl.py", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def metrics(stage_dir: Path) -> dict:
    path = stage_dir / STAGE_METRICS
    assert path.is_file(), f"{stage_dir} holds no finished stage"
    return json.loads(path.read_text())


def assert_continued(prev_dir: Path, stage_dir: Path) -> None:
    """The stage trained the very adapter that prev_dir saved, and started where prev_dir ended."""
    prev, cur = metrics(prev_dir), metrics(stage_dir)
    assert cur["start_adapter_file_sha256"] == prev["saved_adapter_file_sha256"], "lineage: started elsewhere"
    assert cur["start_adapter_tensors_sha256"] == prev["saved_adapter_tensors_sha256"], "lineage: weights differ"
    assert cur["saved_adapter_tensors_sha256"] != cur["start_adapter_tensors_sha256"], "the adapter did not train"
    assert cur["first_eval_file"] == prev["final_eval_file"], "continuity measured on another split"
    jump = abs(cur["first_eval_loss"] - prev["final_eval_loss"]) / prev["final_eval_loss"]
    assert jump <= CONTINUITY_TOLERANCE, (f"continuity: stage {cur['stage']} starts at {cur['first_eval_loss']:.4f}, "
                                          f"previous ended at {prev['final_eval_loss']:.4f} ({jump:.0%} jump)")


@pytest.fixture(scope="session")
def curriculum(tmp_path_factory, tiny_model_path):
    """Stages 1, 2, 3 of the demo curriculum (shortened); stage 3 also carries the optimizer moments over."""
    root = tmp_path_factory.mktemp("curriculum")
    logs = {1: run_stage(*stage_args(1, root)), 2: run_stage(*stage_args(2, root)),
            3: run_stage(*stage_args(3, root, None, None, "--set", "optimizer_state=resume"))}
    return root, logs
