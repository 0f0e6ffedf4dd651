"""Several processes (issue 7): the same script under `accelerate launch`, two CPU processes over gloo, with the
shipped DDP config file. Stage 1 and stage 2 of the demo curriculum, then the faults the checks must catch."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_continued, metrics, wait_for

import train_qlora_qwen3vl as tq
import verify_exp4_fix as vf
from curriculum import faults, processes
from curriculum.adapter_files import ADAPTER_WEIGHTS, read_adapter_lora, save_adapter_under_fsdp
from curriculum.base_model import load_processor, quant_storage_dtype
from curriculum.config import StageConfig, load_config
from curriculum.data_files import IMAGE_CHECK_CACHE
from curriculum.errors import ConfigError
from curriculum.evaluation import merge_answers
from curriculum.lineage import saved_stage_lineage
from curriculum.processes import one_gpu_per_process

PROCESSES, BATCH, ACCUM, EVAL_QUESTIONS = 2, 8, 2, 9


LAUNCH_ENV = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def launch_command(script: str, *args: str) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 SCRIPT ARGS`, as a user would,
    on a free port (accelerate's `0`). On its default 29500, accelerate only moves to a free port when 29500 is
    already taken as it checks: two launches that check at the same moment (as when these tests ran on both pytest
    workers) both take it, and their processes can meet in one rendezvous and wait there for ever."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
            "--num_processes", str(PROCESSES), "--main_process_port", "0", script, *args]


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(launch_command(script, *args), cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True,
                          timeout=900, check=False)


def ddp_stage_args(stage: int, root, out: str | None = None) -> list[str]:
    """One full epoch (max_steps -1), so the step count follows from the effective batch size."""
    args = [f"configs/demo/stage{stage}.yaml", "--set", f"output_dir={root / (out or f'stage{stage}')}",
            "--set", "max_steps=-1", "--set", "epochs=1", "--set", f"batch_size={BATCH}",
            "--set", f"grad_accum={ACCUM}", "--set", "logging_steps=2", "--set", f"eval_questions={EVAL_QUESTIONS}"]
    if stage > 1:
        args += ["--set", f"prev_checkpoint={root / f'stage{stage - 1}'}"]
    return args


@pytest.fixture(scope="module")
def ddp_curriculum(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("ddp")
    logs = {}
    for stage in (1, 2):
        result = launch("train_qlora_qwen3vl.py", *ddp_stage_args(stage, root))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        logs[stage] = result.stdout
    return root, logs


def test_a_new_adapter_starts_the_same_on_every_process_when_the_model_is_built_on_first_use(tmp_path):
    """On a fresh machine the main process builds the tiny model (drawing random numbers) while the other waits; the
    adapters were then initialised from different random states and the run stopped ("the processes hold different
    adapters"). A copy of the project without models/ is that fresh machine."""
    import shutil

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("train_qlora_qwen3vl.py", "vqa_eval.py", "tiny_qwen3vl.py"):
        shutil.copy(REPO / name, fresh)
    for name in ("curriculum", "configs", "data/stage1"):
        shutil.copytree(REPO / name, fresh / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert not (fresh / "models").exists()
    args = ["configs/demo/stage1.yaml", "--set", "output_dir=models/stage1", "--set", "max_steps=2",
            "--set", "eval_questions=0", "--set", "eval_file=null", "--set", "tensorboard=false"]
    result = subprocess.run(launch_command("train_qlora_qwen3vl.py", *args), cwd=fresh, env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Building the tiny random Qwen3-VL" in result.stdout
    assert f"All {PROCESSES} processes hold the same adapter" in result.stdout


def test_stage_2_continues_the_adapter_of_stage_1_on_two_processes(ddp_curriculum):
    root, _ = ddp_curriculum
    assert_continued(root / "stage1", root / "stage2")


def test_every_process_trained_the_adapter_that_was_saved(ddp_curriculum):
    # Before the fix, the first evaluation made accelerate skip the DDP wrap: each process trained its own copy.
    root, _ = ddp_curriculum
    for stage in (1, 2):
        m = metrics(root / f"stage{stage}")
        views = m["processes"]
        assert [v["process"] for v in views] == list(range(PROCESSES)) and m["distributed"] == "ddp"
        assert {v["final_tensors_sha256"] for v in views} == {m["saved_adapter_tensors_sha256"]}
        assert len({v["start_tensors_sha256"] for v in views}) == 1
        assert {v["trainable_params"] for v in views} == {7168}
    m2 = metrics(root / "stage2")
    assert {v["start_tensors_sha256"] for v in m2["processes"]} == {m2["start_adapter_tensors_sha256"]}


def test_verifier_passes_the_stages_and_catches_processes_that_trained_apart(ddp_curriculum, tmp_path):
    import shutil

    root, _ = ddp_curriculum
    for stage in (1, 2):
        stage_dir = root / f"stage{stage}"
        check = vf.check_lineage(stage_dir, metrics(stage_dir), saved_stage_lineage(stage_dir, metrics(stage_dir)))
        assert check.status == vf.PASS and "on 2 processes" in check.detail, check.detail
    apart = tmp_path / "apart"
    shutil.copytree(root / "stage2", apart)
    m = metrics(apart)
    m["processes"][1]["final_tensors_sha256"] = "0" * 64  # as if process 1 had trained a copy of its own
    check = vf.check_lineage(apart, m, saved_stage_lineage(apart, m))
    assert check.status == vf.FAIL and "trained apart" in check.detail


def test_optimizer_steps_follow_from_the_effective_batch_size(ddp_curriculum):
    root, logs = ddp_curriculum
    n_train = sum(1 for line in (REPO / "data/stage1/train.jsonl").read_text().splitlines() if line.strip())
    effective = BATCH * PROCESSES * ACCUM
    m = metrics(root / "stage1")
    assert m["num_processes"] == PROCESSES and m["effective_batch_size"] == effective
    assert m["global_steps"] == math.ceil(n_train / effective) == 7  # one process would take 13
    assert (f"Effective batch size {effective} = {BATCH} per process x {PROCESSES} process(es) x {ACCUM} "
            "accumulation step(s); 7 optimizer steps planned") in logs[1]


def test_predictions_are_gathered_from_every_process_once_in_order(ddp_curriculum):
    root, logs = ddp_curriculum
    gold = [json.loads(line)["id"] for line in (REPO / "data/stage2/dev.jsonl").read_text().splitlines()]
    ids = [json.loads(line)["id"] for line in (root / "stage2/predictions_dev.jsonl").read_text().splitlines()]
    assert ids == gold[:EVAL_QUESTIONS]  # 5 answered by process 0, 4 by process 1: none lost, none twice
    assert metrics(root / "stage2")["dev_metrics"]["overall"]["n"] == EVAL_QUESTIONS
    assert f"({EVAL_QUESTIONS} questions, by generation on {PROCESSES} processes)" in logs[2]


def test_only_the_main_process_writes_and_prints(ddp_curriculum):
    root, logs = ddp_curriculum
    for stage in (1, 2):
        for line in (f"Loaded train from data/stage{stage}/train.jsonl", "Trainable parameters: 7,168",
                     f"Saved stage {stage} to", "final_eval_loss "):
            assert logs[stage].count(line) == 1, line
        assert len(list((root / "tensorboard" / f"stage{stage}").glob("events.out.tfevents.*"))) == 1
    # no .partial or .saving left; .cache holds the images known to decode cleanly, written once
    assert sorted(p.name for p in root.iterdir()) == [".cache", "stage1", "stage2", "tensorboard"]
    assert [p.name for p in (root / ".cache").iterdir()] == [IMAGE_CHECK_CACHE]


def test_broken_variant_fresh_adapter_fails_the_continuity_test_on_two_processes(ddp_curriculum, tmp_path):
    root, _ = ddp_curriculum
    args = ddp_stage_args(2, root, str(tmp_path / "fresh")) + ["--set", "eval_questions=0"]
    result = launch("tests/broken_variants.py", "fresh", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    with pytest.raises(AssertionError, match="lineage|continuity"):
        assert_continued(root / "stage1", tmp_path / "fresh")


def test_a_process_holding_another_adapter_stops_every_process(ddp_curriculum, tmp_path):
    """One machine with a stale copy of prev_checkpoint: that process checks its own copy and passes; only the
    comparison across processes sees it, before any step and before anything is written."""
    root, _ = ddp_curriculum
    args = ddp_stage_args(2, root, str(tmp_path / "stale"))
    result = launch("tests/faults.py", "last-process-reads", str(root / "stage2"), *args)
    assert result.returncode != 0
    assert "error: the processes hold different adapters (weights before the first step: process 0: " in result.stderr
    assert "step 2/" not in result.stdout and not (tmp_path / "stale").exists()


def test_merge_answers_refuses_duplicates_and_gaps():
    assert merge_answers([[(0, "a"), (2, "c")], [(1, "b")]], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="answered by two processes"):
        merge_answers([[(0, "a"), (1, "b")], [(1, "b")]], 2)
    with pytest.raises(RuntimeError, match="1 of 3 questions got no answer"):
        merge_answers([[(0, "a")], [(1, "b")]], 3)


def test_planned_steps_count_a_last_short_accumulation_as_a_step():
    cfg, size = StageConfig(output_dir="x", train_file="x", epochs=1), tq.StepSize(batch_size=8, grad_accum=2)
    assert tq.planned_steps(200, size, cfg, 1) == 13  # 25 batches: 12 full accumulations and a last one of 1 batch
    assert tq.planned_steps(200, size, cfg, 2) == 7   # 13 batches per process
    assert tq.planned_steps(200, size, StageConfig(output_dir="x", train_file="x", max_steps=5), 4) == 5


def test_fsdp_settings_are_checked_before_loading(tmp_path, monkeypatch):
    plain = processes.runtime()
    monkeypatch.setattr(processes, "runtime", lambda: dataclasses.replace(plain, fsdp=True))  # as under FSDP
    cfg = load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path / 'out'}"])
    assert quant_storage_dtype(cfg.quantization) == "bfloat16"  # auto: the compute dtype under FSDP
    bad = load_config("configs/demo/stage2.yaml", [f"output_dir={tmp_path / 'out'}",
                                                     "quantization.quant_storage=uint8",
                                                     "optimizer_state=resume", "prev_checkpoint=null", "stage=1",
                                                     "batch_size=auto"])
    with pytest.raises(ConfigError) as err:
        tq.validate_config(bad)
    assert "quantization.quant_storage: FSDP shards only floating-point tensors" in str(err.value)
    assert "optimizer_state: resume is not supported under FSDP" in str(err.value)
    assert "batch_size: auto measures a step of the whole model, and FSDP shards it" in str(err.value)
    monkeypatch.setattr(processes, "runtime", lambda: plain)
    assert quant_storage_dtype(cfg.quantization) == "uint8"


def test_the_fsdp_save_writes_the_file_peft_writes(tiny_model_path, tmp_path):
    """save_adapter_under_fsdp takes the adapter out of the gathered full state dict (here the model's own, as
    accelerate returns it): the same tensors, names and config as peft's save_pretrained, and it reopens."""
    import types

    import torch
    from safetensors.torch import load_file

    cfg = load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path / 'unused'}"])
    processor = load_processor(tiny_model_path, cfg)
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(str(tmp_path / "peft"))
    accelerator = types.SimpleNamespace(get_state_dict=lambda wrapped: wrapped.state_dict())
    trainer = types.SimpleNamespace(accelerator=accelerator, model=model, is_world_process_zero=lambda: True)
    save_adapter_under_fsdp(trainer, model, processor, tmp_path / "fsdp")
    peft_file, ours = load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "fsdp" /
                                                                                          ADAPTER_WEIGHTS))
    assert sorted(ours) == sorted(peft_file) and len(ours) == 16
    assert all(torch.equal(ours[k], peft_file[k]) for k in ours)
    assert read_adapter_lora(tmp_path / "fsdp") == read_adapter_lora(tmp_path / "peft")
    reopened = tq.continue_adapter(tq.load_quantized_base(tiny_model_path, cfg), str(tmp_path / "fsdp"))
    tq.check_loaded_adapter_matches(reopened, str(tmp_path / "fsdp"))
    assert tq.check_adapter_trainable(reopened, cfg.lora) == 7168


def test_an_adapter_file_without_the_trained_weights_is_never_saved_as_the_stage(tmp_path):
    from conftest import run_script

    args = ["configs/demo/stage1.yaml", "--set", f"output_dir={tmp_path / 'stage1'}", "--set", "max_steps=2",
            "--set", "eval_questions=0", "--set", "tensorboard=false"]
    result = run_script("tests/faults.py", "empty-adapter-save", *args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "holds 0 LoRA parameters, but 7,168 were trained; nothing was saved as the stage" in result.stderr
    assert not (tmp_path / "stage1").exists()
    check = vf.check_adapter_files(tmp_path / "stage1.saving")  # what was written, refused by the verifier too
    assert check.status == vf.FAIL and "holds no tensors: an empty adapter was saved" in check.detail


def test_sigterm_to_every_process_saves_a_checkpoint_and_the_same_command_resumes(tiny_model_path, tmp_path):
    """torchrun, Ctrl-C and cluster schedulers signal the whole process group, dataloader workers included. The
    workers must not die of it before the training processes have saved the checkpoint they stop at."""
    import signal

    args = ["configs/demo/stage1.yaml", "--set", f"output_dir={tmp_path / 'stage1'}", "--set", "max_steps=40",
            "--set", "save_steps=100", "--set", "logging_steps=2", "--set", "batch_size=2", "--set", "lr=1e-4",
            "--set", "eval_questions=0", "--set", "tensorboard=false"]
    log = tmp_path / "term.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(launch_command("train_qlora_qwen3vl.py", *args), cwd=REPO, env=LAUNCH_ENV,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "step 6/40" in log.read_text(), proc, timeout=300, log=log)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher, both training processes and their dataloader workers
    proc.wait(timeout=300)
    text = log.read_text()
    assert "Received SIGTERM: saving a checkpoint after this step" in text
    assert "Stopped: stopped by SIGTERM at step" in text and "killed by signal" not in text, text[-3000:]
    checkpoints = faults.complete_checkpoints(tmp_path / "stage1.partial")
    assert checkpoints and 6 <= int(checkpoints[-1].name.split("-")[1]) < 40  # saved where it stopped
    result = launch("train_qlora_qwen3vl.py", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Resuming stage 1 from {checkpoints[-1]}" in result.stdout
    m = metrics(tmp_path / "stage1")
    assert m["global_steps"] == 40 and m["resumed_from_step"] == int(checkpoints[-1].name.split("-")[1])
    assert {v["final_tensors_sha256"] for v in m["processes"]} == {m["saved_adapter_tensors_sha256"]}


def training_processes(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes `accelerate launch` started (its children with RANK set)."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ppid == launcher_pid and rank:
            ranks[int(rank[0])] = int(stat.parent.name)
    return ranks


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tiny_model_path, tmp_path):
    """The processes decide to stop together. A signal reaches them at different points of their steps (under load,
    one can be a step ahead); here only one process gets it at all. Each stopping alone would leave the other
    waiting in its next gradient exchange until the launcher kills it, with no checkpoint of that step."""
    import signal

    args = ["configs/demo/stage1.yaml", "--set", f"output_dir={tmp_path / 'stage1'}", "--set", "max_steps=40",
            "--set", "save_steps=100", "--set", "logging_steps=2", "--set", "batch_size=2", "--set", "lr=1e-4",
            "--set", "eval_questions=0", "--set", "tensorboard=false"]
    log = tmp_path / "one.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(launch_command("train_qlora_qwen3vl.py", *args), cwd=REPO, env=LAUNCH_ENV,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: "step 6/40" in log.read_text(), proc, timeout=300, log=log)
    ranks = training_processes(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)  # rank 1 only: rank 0 hears of it through the step's shared decision
    try:
        proc.wait(timeout=120)  # seconds when they stop together; without it they hang
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Stopped: stopped by SIGTERM at step" in text, text[-3000:]  # said by rank 0, which got no signal
    checkpoints = faults.complete_checkpoints(tmp_path / "stage1.partial")
    assert checkpoints and 6 <= int(checkpoints[-1].name.split("-")[1]) < 40, text[-3000:]


def test_one_process_that_sees_several_gpus_trains_on_one_not_with_data_parallel(tmp_path):
    """On the two H200s a plain `python train_qlora_qwen3vl.py` trained through nn.DataParallel: a batch of 2 x 96
    split over both GPUs, 30 GiB on the first, the rate reported for 96. TrainingArguments counts the visible GPUs
    into `_n_gpu`, which the Trainer reads for DataParallel and the batch size."""
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=96, use_cpu=True,
                             report_to="none")
    assert args.n_gpu == 0 and hasattr(args, "_n_gpu")  # the attribute the pinned transformers keeps the count in
    args._n_gpu = 2  # what it sets where one process sees two GPUs
    assert args.train_batch_size == 192
    one_gpu_per_process(args, world=2)  # under accelerate launch each process already has one GPU: untouched
    assert args.n_gpu == 2
    one_gpu_per_process(args, world=1)
    assert args.n_gpu == 1 and args.train_batch_size == 96


def test_under_loadgroup_this_module_runs_on_one_pytest_worker(request):
    """The README's test command (`-n 2 --dist loadgroup`) keeps this module on one worker: two workers would each
    train `ddp_curriculum`, and launch two-process runs at once. xdist puts a test's group into its node id; when
    conftest's markers came too late, nothing said so but the time the suite took."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("only under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@test_processes"), request.node.nodeid
