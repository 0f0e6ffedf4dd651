"""Every speed patch checks, before the model loads, that what it replaces is what it was written for.

Each test puts a stand-in in place of the library piece a patch relies on (a module without the expected name, a
method with another signature) and shows the guard fire: with `auto` the patch steps aside and says why, naming the
versions; with `true` it is a config error that names the key. The last test trains a stage with every guard firing.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_script, stage_args
from faults import (
    deepstack_changed,
    image_features_without_the_cast,
    liger_qwen3_vl_missing,
    peft_without_4bit_lora,
    rope_index_reads_the_model,
    text_attention_not_declared_causal,
    trainer_compute_loss_changed,
    triton_missing,
    vision_attention_changed,
)

import train_qlora_qwen3vl as tq
from curriculum import speed
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.config import StageConfig, load_config
from curriculum.errors import ConfigError
from curriculum.stage_folder import STAGE_METRICS


def config(tmp_path, *overrides: str) -> StageConfig:
    return load_config(REPO / "configs/demo/stage1.yaml", [f"output_dir={tmp_path / 'out'}", *overrides])


def test_the_pinned_stack_takes_every_patch(monkeypatch):
    """requirements.txt's versions work together: Liger's Qwen3-VL entry point imports (it did not with
    transformers 5.24), and every signature the patches replace is the one they were written for."""
    monkeypatch.setattr(speed, "gpu_available", lambda: True)  # Liger's check goes past "no GPU" to the imports
    for patch in speed.SPEED_PATCHES:
        assert patch.problem() is None, patch.key
    assert speed.partial_checkpointing_problem() is None


STAND_INS = {  # what each stand-in makes the guard say
    "liger_kernels": (liger_qwen3_vl_missing, r"liger-kernel \S+, transformers \S+ do not work together "
                                              r"\(ImportError: cannot import name 'LigerQwen3VLCausalLMOutput"),
    "batched_vision_attention": (vision_attention_changed, r"Qwen3VLVisionAttention.forward takes \(hidden_states, "
                                                           r"cu_seqlens, rotary_pos_emb"),
    "fused_lora_forward": (peft_without_4bit_lora, r"peft \S+, bitsandbytes \S+: no LoRA layer for 4-bit weights"),
    "answer_only_logits": (trainer_compute_loss_changed, r"Trainer.compute_loss takes \(.*loss_kwargs\)"),
    "positions_in_dataloader": (rope_index_reads_the_model, r"Qwen3VLModel.get_rope_index reads self.rope_deltas"),
    "vision_without_autocast": (image_features_without_the_cast, r"transformers \S+: Qwen3VLModel.get_image_features "
                                                                 r"no longer casts the pixels"),
    "deepstack_by_index": (deepstack_changed, r"transformers \S+: Qwen3VLTextModel._deepstack_process is not the "
                                              r"one the replacement was written for"),
    "fused_lora_dropout": (triton_missing, r"triton is not installed"),
    "drop_padding_mask": (text_attention_not_declared_causal, r"transformers \S+: Qwen3-VL's text attention is no "
                                                              r"longer causal"),
}


@pytest.mark.parametrize("key", list(STAND_INS))
def test_a_patch_that_no_longer_fits_steps_aside_under_auto_and_is_an_error_under_true(key, monkeypatch, tmp_path):
    stand_in, reason = STAND_INS[key]
    stand_in(monkeypatch)
    decisions, problems = speed.plan_speed_patches(config(tmp_path))
    assert not decisions[key].on
    assert decisions[key].note.startswith("off: ")
    assert "cost: " in decisions[key].note
    assert re.search(reason, decisions[key].note), decisions[key].note
    assert problems == []  # auto: a note, not a problem
    tq.validate_config(config(tmp_path, "batch_size=4"))  # ... so the stage goes on
    with pytest.raises(ConfigError, match=rf"{key}: true, but .* cannot run here: .*Set {key}: auto"):
        tq.validate_config(config(tmp_path, "batch_size=4", f"{key}=true"))


def test_partial_checkpointing_needs_the_per_layer_flag(monkeypatch, tmp_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    own = GradientCheckpointingLayer.__call__

    def call_without_the_flag(self, *args, **kwargs):  # a transformers that checkpoints by another switch
        return own(self, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", call_without_the_flag)
    tq.validate_config(config(tmp_path, "gradient_checkpointing=true"))  # all layers: no per-layer switching
    with pytest.raises(ConfigError, match="checkpointed_layers: 0.5 needs per-layer checkpointing: .*no longer "
                                             "reads a per-layer flag"):
        tq.validate_config(config(tmp_path, "gradient_checkpointing=true", "checkpointed_layers=0.5"))


def test_training_on_a_cpu_is_refused_when_bitsandbytes_repacks_under_another_switch(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the guard is for training on the CPU; this machine has a GPU")
    import bitsandbytes

    def forward(self, x):  # repacks for avx512 under a switch the trainer does not know
        if self.use_avx512_inference_layout:
            return x
        return x

    monkeypatch.setattr(bitsandbytes.nn.Linear4bit, "forward", forward)
    with pytest.raises(ConfigError, match="training on the CPU: bitsandbytes .* repacks 4-bit weights"):
        tq.validate_config(config(tmp_path, "batch_size=4"))


def test_a_stage_trains_with_every_guard_firing(tmp_path, tiny_model_path):
    """The stand-ins above, all at once, in a real stage: it trains with the libraries' own code, logs one line per
    patch that stepped aside, and records them in stage_metrics.json."""
    result = run_script("tests/faults.py", "speed-patches-do-not-fit", *stage_args(1, tmp_path), "--set",
                        "max_steps=3", "--set", "eval_questions=0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for key, (_, reason) in STAND_INS.items():
        name = next(p.name for p in speed.SPEED_PATCHES if p.key == key)
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"Speed patch {name}: "))
        assert re.search(reason, line), line
    recorded = json.loads((tmp_path / "stage1" / STAGE_METRICS).read_text())["speed_patches"]
    assert all(recorded[key].startswith("off: ") for key in STAND_INS), recorded


def test_transformers_adapter_api_works_on_a_finished_stage(curriculum, tiny_model_path):
    """A user who loads a finished stage with transformers (not peft) can use its adapter API: transformers 5.24
    refused every call with peft 0.21 ("please use a version >= 0.22.0")."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    root, _ = curriculum
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32)
    model.load_adapter(str(root / "stage1"))
    assert model.active_adapters() == ["default"]
    saved = load_file(str(root / "stage1" / ADAPTER_WEIGHTS))  # peft's names: base_model.model.<name>.weight
    loaded = {n.replace(".default.", "."): p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(n.removeprefix("base_model.model.") for n in saved)
    assert all(torch.equal(loaded[n.removeprefix("base_model.model.")], t) for n, t in saved.items())
    model.disable_adapters()
    model.enable_adapters()
    assert model.active_adapters() == ["default"]


def test_under_fsdp_the_fused_lora_forward_steps_aside(tmp_path):
    """On 2 H200s FSDP-QLoRA stopped with an illegal memory access: the fused forward reads lora_B.weight, which under
    FSDP is a sharded flat parameter that only lora_B's own forward gathers (bench/RESULTS.md). A CPU cannot run FSDP
    over 4-bit weights; what it can check is that the plan keeps the fused forward off there."""
    decisions, problems = speed.plan_speed_patches(config(tmp_path), fsdp=True)
    assert not decisions["fused_lora_forward"].on and "under FSDP" in decisions["fused_lora_forward"].note
    assert problems == []
    assert speed.plan_speed_patches(config(tmp_path), fsdp=False)[0]["fused_lora_forward"].on
    _, problems = speed.plan_speed_patches(config(tmp_path, "fused_lora_forward=true"), fsdp=True)
    assert any(p.startswith("fused_lora_forward: true, but fused LoRA forward cannot run here: under FSDP")
               for p in problems), problems


OFFLOAD = ("offload_activations=true", "gradient_checkpointing=true")


def test_activation_offload_is_checked_before_the_model_loads(monkeypatch, tmp_path):
    """offload_activations needs checkpointing to offload from, is refused under FSDP (not tested there), and needs
    transformers to call the checkpoint function as it was written for."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert speed.offload_problem() is None  # the pinned stack
    tq.validate_config(config(tmp_path, "batch_size=4", *OFFLOAD))
    decisions, _ = speed.plan_speed_patches(config(tmp_path, *OFFLOAD))
    assert decisions["offload_activations"].on
    with pytest.raises(ConfigError, match="offload_activations: true cannot run here: .*gradient_checkpointing: "
                                             "true"):
        tq.validate_config(config(tmp_path, "batch_size=4", "offload_activations=true",
                                  "gradient_checkpointing=false"))
    _, problems = speed.plan_speed_patches(config(tmp_path, *OFFLOAD), fsdp=True)
    assert any("offload_activations: true cannot run here: not tested under FSDP" in p for p in problems)

    def checkpoint_everything(self, *args, **kwargs):  # a transformers that calls the function another way
        return self._gradient_checkpointing_func(super(GradientCheckpointingLayer, self).__call__, *args, **kwargs)

    monkeypatch.setattr(GradientCheckpointingLayer, "__call__", checkpoint_everything)
    with pytest.raises(ConfigError, match=r"offload_activations: true cannot run here: transformers \S+: "
                                             r"GradientCheckpointingLayer no longer calls"):
        tq.validate_config(config(tmp_path, "batch_size=4", *OFFLOAD))
    tq.validate_config(config(tmp_path, "batch_size=4"))  # off: nothing to check


def test_a_stage_with_activation_offload_says_so_and_records_it(tmp_path, tiny_model_path):
    out = tmp_path / "stage1"
    proc = run_script("train_qlora_qwen3vl.py", *stage_args(1, tmp_path, str(out)), "--set", "max_steps=2",
                      *(arg for setting in OFFLOAD for arg in ("--set", setting)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_layers = json.loads((REPO / "models/tiny-qwen3vl/config.json").read_text())["text_config"]["num_hidden_layers"]
    line = (f"Speed patch activation offload: on ({n_layers} checkpointed decoder layers keep their inputs in a copy "
            "(a CPU run: nothing to save))")
    assert line in proc.stdout + proc.stderr
    recorded = json.loads((out / "stage_metrics.json").read_text())["speed_patches"]["offload_activations"]
    assert recorded == line.split(": ", 1)[1]


def test_cpu_threads_wait_passively_unless_the_user_says_otherwise():
    """Set at import, before torch loads (OpenMP reads it then); a value the user set is kept."""
    code = ("import os, sys; import train_qlora_qwen3vl; assert 'torch' not in sys.modules; "
            "print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "PASSIVE"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "ACTIVE"
