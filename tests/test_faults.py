"""Faults on the tiny model: a killed or interrupted stage resumes, a diverged or out-of-memory stage stops
with a clear message, and nothing already saved is touched."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, metrics, run_script, stage_args, wait_for
from safetensors.torch import load_file

from curriculum import faults
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.stage_folder import STAGE_METRICS

STEPS = 12


def args_for(out: Path, *extra: str) -> list[str]:
    return ["configs/demo/stage1.yaml", "--set", f"output_dir={out}", "--set", f"max_steps={STEPS}",
            "--set", "save_steps=4", "--set", "logging_steps=2", "--set", "eval_questions=0",
            "--set", "tensorboard=false", *extra]


def tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train_qlora_qwen3vl.py", *args], cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_path) -> dict:
    out = tmp_path_factory.mktemp("faults") / "reference"
    result = run_script("train_qlora_qwen3vl.py", *args_for(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return metrics(out)


def test_killed_stage_resumes_to_the_same_adapter(tmp_path, uninterrupted):
    out = tmp_path / "stage"
    proc = start(args_for(out), tmp_path / "killed.log")
    wait_for(lambda: (out.with_name("stage.partial") / "checkpoint-8" / "trainer_state.json").is_file(), proc,
             log=tmp_path / "killed.log")
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    assert not out.exists()
    result = run_script("train_qlora_qwen3vl.py", *args_for(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resuming stage 1 from" in result.stdout and "checkpoint-8" in result.stdout
    m = metrics(out)
    assert m["global_steps"] == STEPS and [h["step"] for h in m["train_loss_history"]][-1] == STEPS
    assert m["resumed_from_step"] == 8 and uninterrupted["resumed_from_step"] is None
    # step, optimizer, scheduler, RNG and data order restored: the very same weights as a run never killed
    assert m["saved_adapter_tensors_sha256"] == uninterrupted["saved_adapter_tensors_sha256"]
    assert m["first_eval_loss"] == uninterrupted["first_eval_loss"]
    assert not out.with_name("stage.partial").exists()


def stop_with(sig: signal.Signals, after_log_line: str, out: Path, log: Path) -> tuple[int, str]:
    """Start a stage, send `sig` once `after_log_line` is logged; (exit code, log)."""
    proc = start(args_for(out), log)
    wait_for(lambda: after_log_line in log.read_text(), proc, log=log)
    proc.send_signal(sig)
    return proc.wait(timeout=300), log.read_text()


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, uninterrupted):
    out = tmp_path / "stage"
    code, text = stop_with(signal.SIGTERM, "step 6/12", out, tmp_path / "term.log")
    assert code == 143
    assert "Received SIGTERM: saving a checkpoint after this step" in text
    assert "Run the same command to resume." in text and "Traceback" not in text
    checkpoints = sorted(out.with_name("stage.partial").glob("checkpoint-*"))
    stopped_at = int(checkpoints[-1].name.split("-")[1])
    assert 6 <= stopped_at < STEPS and not out.exists()
    result = run_script("train_qlora_qwen3vl.py", *args_for(out))
    assert result.returncode == 0 and f"checkpoint-{stopped_at}" in result.stdout
    assert metrics(out)["saved_adapter_tensors_sha256"] == uninterrupted["saved_adapter_tensors_sha256"]


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "stage"
    code, text = stop_with(signal.SIGINT, "step 2/12", out, tmp_path / "int.log")
    assert code == 130
    assert "Received SIGINT: saving a checkpoint after this step" in text and "Traceback" not in text
    assert "Stopped: stopped by SIGINT at step" in text and not out.exists()
    assert faults.complete_checkpoints(out.with_name("stage.partial"))  # something to resume from


def test_interrupted_run_with_other_settings_is_not_resumed_or_deleted(tmp_path):
    out = tmp_path / "stage"
    proc = start(args_for(out), tmp_path / "log")
    wait_for(lambda: (out.with_name("stage.partial") / "checkpoint-4" / "trainer_state.json").is_file(), proc,
             log=tmp_path / "log")
    proc.kill()
    proc.wait()
    before = tree_hashes(out.with_name("stage.partial"))
    result = run_script("train_qlora_qwen3vl.py", *args_for(out, "--set", "lr=1e-3"))
    assert result.returncode == 2 and "holds an interrupted run of this stage with other settings (lr)" in result.stderr
    assert tree_hashes(out.with_name("stage.partial")) == before


def test_diverged_loss_stops_without_saving_nan_weights(curriculum, tmp_path):
    root, _ = curriculum
    before = tree_hashes(root / "stage1")
    out = tmp_path / "nan"
    result = run_script("train_qlora_qwen3vl.py", *stage_args(2, root, str(out)), "--set", "lr=1e36",
                        "--set", "warmup_ratio=0", "--set", "save_steps=1", "--set", "tensorboard=false")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: the LoRA weights became non-finite (NaN/inf) at step" in result.stderr
    assert "Nothing was saved as the stage. Lower lr" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
    for checkpoint in out.with_name("nan.partial").glob("checkpoint-*"):  # every checkpoint kept is finite
        weights = load_file(str(checkpoint / ADAPTER_WEIGHTS))
        assert all(t.isfinite().all() for t in weights.values()), checkpoint
    assert tree_hashes(root / "stage1") == before


def test_out_of_memory_names_the_settings_to_change(curriculum, tmp_path):
    root, _ = curriculum
    before = tree_hashes(root / "stage1")
    result = run_script("tests/faults.py", "oom", *stage_args(2, root, str(tmp_path / "oom")),
                        "--set", "tensorboard=false")
    assert result.returncode == 3
    assert "error: out of GPU memory. Lower memory_budget_gib (with batch_size: auto) or batch_size" in result.stderr
    for setting in ("grad_accum", "max_pixels", "gradient_checkpointing: true", "eval_batch_size"):
        assert setting in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "oom").exists()
    assert tree_hashes(root / "stage1") == before
    assert json.loads((root / "stage1" / STAGE_METRICS).read_text())["stage"] == 1


def private_tmpfs_available() -> bool:
    """A tmpfs of our own needs a private mount namespace: `unshare` with user namespaces (no root needed)."""
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False).returncode == 0


# Runs inside a private mount namespace with a 128 MiB tmpfs at $MNT; every step's output goes to $REPORT (outside
# the tmpfs, so it survives the namespace) and a copy of the tmpfs after each step to $REPORT/after_<step>.
DISK_FULL_SCRIPT = r"""
set -u
mount -t tmpfs -o size=128m tmpfs "$MNT" || exit 90
cp -r "$PREV" "$MNT/stage1"
step() {
  name=$1; shift
  "$PY" "$@" > "$REPORT/$name.out" 2> "$REPORT/$name.err"; echo $? > "$REPORT/$name.rc"
  mkdir "$REPORT/after_$name" && tar -C "$MNT" --exclude=./filler -cf - . | tar -C "$REPORT/after_$name" -xf -
  rm -f "$MNT/filler"
}
step checkpoint tests/faults.py fill-disk-at-step 5 $ARGS
step resume train_qlora_qwen3vl.py $ARGS
step final_save tests/faults.py fill-disk-at-step 8 $ARGS --set overwrite=true --set save_steps=0
"""


@pytest.mark.skipif(not private_tmpfs_available(), reason="needs `unshare --user --mount` to mount a small tmpfs")
def test_disk_full_keeps_every_saved_file_and_the_same_command_resumes(curriculum, tmp_path):
    root, _ = curriculum
    mnt, report = tmp_path / "mnt", tmp_path / "report"
    mnt.mkdir()
    report.mkdir()
    args = (f"configs/demo/stage2.yaml --set output_dir={mnt}/stage2 --set prev_checkpoint={mnt}/stage1 "
            "--set max_steps=8 --set save_steps=2 --set logging_steps=2 --set eval_questions=0 "
            "--set tensorboard=false")
    env = {**__import__("os").environ, "MNT": str(mnt), "REPORT": str(report), "PREV": str(root / "stage1"),
           "PY": sys.executable, "ARGS": args, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", DISK_FULL_SCRIPT],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    out = {name: (int((report / f"{name}.rc").read_text()), (report / f"{name}.out").read_text(),
                  (report / f"{name}.err").read_text()) for name in ("checkpoint", "resume", "final_save")}
    stage1 = tree_hashes(root / "stage1")

    # 1. The disk fills before the step-6 checkpoint: exit 4, a clear message, the cut-short checkpoint removed.
    rc, stdout, stderr = out["checkpoint"]
    assert "filled the disk after step 5" in stdout
    assert rc == 4, stderr[-2000:]
    assert "error: no space left on device while writing a checkpoint in" in stderr and "Traceback" not in stderr
    assert f"Free space on that disk and run the same command: it resumes from {mnt}/stage2.partial/checkpoint-4." \
        in stderr
    after = report / "after_checkpoint"
    assert sorted(p.name for p in (after / "stage2.partial").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert tree_hashes(after / "stage1") == stage1 and not (after / "stage2").exists()

    # 2. Space freed, the same command resumes from the last complete checkpoint and finishes.
    rc, stdout, stderr = out["resume"]
    assert rc == 0, stderr[-2000:]
    assert f"Resuming stage 2 from {mnt}/stage2.partial/checkpoint-4" in stdout
    finished = report / "after_resume"
    m = metrics(finished / "stage2")
    assert m["global_steps"] == 8 and m["resumed_from_step"] == 4
    assert tree_hashes(finished / "stage1") == stage1

    # 3. The disk fills before the final save over that finished stage (overwrite: true): the old stage stays whole.
    rc, stdout, stderr = out["final_save"]
    assert rc == 4, stderr[-2000:]
    assert f"no space left on device while writing the stage to {mnt}/stage2.saving" in stderr
    assert "Traceback" not in stderr and f"{mnt}/stage2" in stderr.split("intact")[0]
    after = report / "after_final_save"
    assert tree_hashes(after / "stage2") == tree_hashes(finished / "stage2")
    assert tree_hashes(after / "stage1") == stage1
    assert not (after / "stage2.saving").exists() and not (after / "stage2.replaced").exists()
