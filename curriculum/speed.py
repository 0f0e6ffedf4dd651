"""Speed patches of library internals, each behind a config key, each guarded.

A patch replaces a piece of transformers, peft, bitsandbytes or Liger that it was written against. Libraries move,
so before anything loads each patch checks that what it replaces is still what it was written for (the names, the
signatures it relies on). `plan_speed_patches` makes that decision once per stage:

- `auto` (the default): a patch that cannot apply steps aside, with one log line naming it, the versions and the
  cost, and `stage_metrics.json` records it under `speed_patches`;
- `true`: the same is a config error, before the model loads;
- `false`: the library's own code, always.

The recipe calls `plan_speed_patches` in its validation, `keep_4bit_layers_differentiable` and
`apply_gradient_checkpointing` when the 4-bit base has loaded (its load_quantized_base), and `apply_speed_patches`
once the adapter is on the model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import re
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from curriculum.config import StageConfig
from curriculum.errors import ConfigError
from curriculum.processes import gpu_available  # the environment as read once (processes.runtime)


def quiet_optional_backend_warnings() -> None:
    """Drop two import-time warnings that read like a broken install and are not one:
    - bitsandbytes on a CPU with AVX512-BF16 tries the optional `kernels` package for a faster *inference* GEMV and
      warns when it is missing. Training never uses that path (keep_4bit_layers_differentiable keeps the trainable
      layout).
    - Liger looks for kernels for other hardware (Ascend NPUs, CuTe DSL) and warns for each one it cannot import; the
      Triton kernels used on NVIDIA GPUs are unaffected."""

    def drop(logger: str, fragment: str) -> None:
        logging.getLogger(logger).addFilter(lambda record: fragment not in str(record.msg))

    drop("bitsandbytes.backends.cpu.ops", "kernels-community")
    drop("liger_kernel.backends.registry", "could not be imported")


def versions(*packages: str) -> str:
    """'liger-kernel 0.8.5, transformers 5.22.2': the installed versions, for the log line of a patch that stepped
    aside."""
    found = []
    for name in packages:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def parameter_names(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------------------------
# What each patch needs of the installed libraries: None when it can apply, else why not
# ---------------------------------------------------------------------------------------------------------------------

# Qwen3VLVisionAttention.forward as batched_vision_attention_forward was written for (transformers 5.x)
VISION_ATTENTION_PARAMETERS = ["self", "hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen", "kwargs"]
# peft's LoRA-on-4-bit forward, and the per-adapter attributes fused_lora_4bit_forward reads
LORA_4BIT_FORWARD_PARAMETERS = ["self", "x", "args", "kwargs"]
LORA_LAYER_ATTRIBUTES = ("lora_A", "lora_B", "scaling", "lora_dropout")
# Qwen3VLModel.get_rope_index as MRopePositions calls it (transformers 5.x)
ROPE_INDEX_PARAMETERS = ["self", "input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw",
                         "attention_mask", "kwargs"]
# Qwen3VLTextModel._deepstack_process as deepstack_by_index was written for (transformers 5.x)
DEEPSTACK_PARAMETERS = ["self", "hidden_states", "visual_pos_masks", "visual_embeds"]
# Trainer.compute_loss, which AnswerOnlyLossTrainer overrides
COMPUTE_LOSS_PARAMETERS = ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]


def liger_problem() -> str | None:
    """Liger's Qwen3-VL entry point imports its own output class, which it defines only for the transformers
    versions it supports; importing it here is what it would do at the first call."""
    if not gpu_available():
        return "no GPU (Liger's kernels are Triton, GPU only)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed (pip install -r requirements.txt)"
    try:
        import liger_kernel.transformers as liger

        importlib.import_module("liger_kernel.transformers.model.qwen3_vl")
    except Exception as err:  # any import failure means the same: this pair of versions does not work together
        return f"{versions('liger-kernel', 'transformers')} do not work together ({first_line(err)})"
    missing = [n for n in ("apply_liger_kernel_to_qwen3_vl", "LigerSwiGLUMLP") if not hasattr(liger, n)]
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    missing += [f"transformers' {n}" for n in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision",
                                               "Qwen3VLTextRMSNorm") if not hasattr(modeling_qwen3_vl, n)]
    if missing:
        return f"{versions('liger-kernel', 'transformers')}: {', '.join(missing)} not found"
    return None


def vision_attention_problem() -> str | None:
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    attention = getattr(modeling_qwen3_vl, "Qwen3VLVisionAttention", None)
    if attention is None or not hasattr(modeling_qwen3_vl, "apply_rotary_pos_emb_vision"):
        return f"{versions('transformers')} has no Qwen3VLVisionAttention or apply_rotary_pos_emb_vision"
    found = parameter_names(attention.forward)
    if found != VISION_ATTENTION_PARAMETERS:
        return (f"{versions('transformers')}: Qwen3VLVisionAttention.forward takes ({', '.join(found[1:])}), the "
                f"replacement was written for ({', '.join(VISION_ATTENTION_PARAMETERS[1:])})")
    return None


def vision_autocast_problem() -> str | None:
    """run_vision_tower_without_autocast turns autocast off around the vision tower, whose input is then the pixels in
    the dtype Qwen3VLModel.get_image_features casts them to: the vision tower's own."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model = getattr(modeling_qwen3_vl, "Qwen3VLModel", None)
    source = inspect.getsource(model.get_image_features) if hasattr(model, "get_image_features") else ""
    if "pixel_values.type(self.visual.dtype)" not in source or "self.visual(" not in source:
        return (f"{versions('transformers')}: Qwen3VLModel.get_image_features no longer casts the pixels to the "
                "vision tower's dtype before calling it")
    return None


def padding_mask_problem() -> str | None:
    """Without the padding mask the text model attends causally alone. That is exact for every real token of a
    right-padded row (its padding comes after it, and causal attention never looks ahead), as long as the text
    model's attention is causal and the mask is built by create_causal_mask, which leaves it out (SDPA's is_causal
    then) when no mask is given."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    attention = getattr(modeling_qwen3_vl, "Qwen3VLTextAttention", None)
    if attention is None or "self.is_causal = True" not in inspect.getsource(attention.__init__):
        return f"{versions('transformers')}: Qwen3-VL's text attention is no longer causal (is_causal = True)"
    text_model = getattr(modeling_qwen3_vl, "Qwen3VLTextModel", None)
    if text_model is None or "create_causal_mask(" not in inspect.getsource(text_model.forward):
        return f"{versions('transformers')}: Qwen3VLTextModel.forward no longer builds its mask by create_causal_mask"
    return None


DEEPSTACK_SOURCE_LINES = ("local_this = hidden_states[visual_pos_masks, :] + visual_embeds",
                          "hidden_states[visual_pos_masks, :] = local_this")


def deepstack_problem() -> str | None:
    """add_deepstack_by_index replaces Qwen3VLTextModel._deepstack_process, which adds each deepstack layer's visual
    features to the image tokens' hidden states through a boolean mask, as it reads in transformers 5.x."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    text_model = getattr(modeling_qwen3_vl, "Qwen3VLTextModel", None)
    method = getattr(text_model, "_deepstack_process", None)
    if method is None:
        return f"{versions('transformers')}: Qwen3VLTextModel has no _deepstack_process"
    found = parameter_names(method)
    source = inspect.getsource(method)
    if found != DEEPSTACK_PARAMETERS or not all(line in source for line in DEEPSTACK_SOURCE_LINES):
        return (f"{versions('transformers')}: Qwen3VLTextModel._deepstack_process is not the one the replacement was "
                "written for (hidden_states[visual_pos_masks, :] + visual_embeds)")
    return None


def fused_lora_problem() -> str | None:
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError as err:  # peft defines Linear4bit only when bitsandbytes imports
        return f"{versions('peft', 'bitsandbytes')}: no LoRA layer for 4-bit weights ({first_line(err)})"
    found = parameter_names(Linear4bit.forward)
    if found != LORA_4BIT_FORWARD_PARAMETERS:
        return f"{versions('peft')}: Linear4bit.forward takes ({', '.join(found[1:])}), not (x, *args, **kwargs)"
    known = set(getattr(LoraLayer, "adapter_layer_names", ())) | set(getattr(LoraLayer, "other_param_names", ()))
    missing = [n for n in LORA_LAYER_ATTRIBUTES if n not in known]
    missing += [n for n in ("disable_adapters", "merged", "active_adapters") if not hasattr(Linear4bit, n)]
    if missing:
        return f"{versions('peft')}: LoRA layers no longer have {', '.join(missing)}"
    return None


def lora_dropout_kernel_problem() -> str | None:
    """curriculum/lora_dropout.py's kernels are Triton, for CUDA; they are checked on the GPU itself when bound
    (check_lora_dropout_kernel)."""
    if not gpu_available():
        return "no GPU (the kernel is Triton, GPU only)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it comes with torch's CUDA wheels)"
    return None


def answer_only_logits_problem() -> str | None:
    from transformers import Trainer, TrainingArguments
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration

    found = parameter_names(Trainer.compute_loss)
    if found != COMPUTE_LOSS_PARAMETERS:
        return (f"{versions('transformers')}: Trainer.compute_loss takes ({', '.join(found[1:])}), the override "
                f"was written for ({', '.join(COMPUTE_LOSS_PARAMETERS[1:])})")
    if "logits_to_keep" not in inspect.signature(Qwen3VLForConditionalGeneration.forward).parameters:
        return f"{versions('transformers')}: Qwen3-VL's forward takes no logits_to_keep"
    if not hasattr(TrainingArguments, "average_tokens_across_devices"):
        return f"{versions('transformers')}: TrainingArguments has no average_tokens_across_devices"
    # AnswerOnlyLossTrainer sets model_accepts_loss_kwargs so that the Trainer counts the answer tokens of the whole
    # accumulated step and does not divide the loss by the accumulation steps again
    counting = getattr(Trainer, "_get_num_items_in_batch", None)
    if counting is None or "self.model_accepts_loss_kwargs" not in inspect.getsource(counting) \
            or "self.model_accepts_loss_kwargs" not in inspect.getsource(Trainer.training_step):
        return (f"{versions('transformers')}: the Trainer no longer counts the tokens of an accumulated step under "
                "model_accepts_loss_kwargs")
    return None


def positions_in_dataloader_problem() -> str | None:
    """MRopePositions runs transformers' own Qwen3VLModel.get_rope_index on a stand-in that has only the model's
    config (and get_vision_position_ids), and hands the forward its result as position_ids, which the forward
    takes in place of its own computation."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    model = getattr(modeling_qwen3_vl, "Qwen3VLModel", None)
    if model is None or not all(hasattr(model, n) for n in ("get_rope_index", "get_vision_position_ids")):
        return f"{versions('transformers')}: Qwen3VLModel has no get_rope_index or get_vision_position_ids"
    found = parameter_names(model.get_rope_index)
    if found != ROPE_INDEX_PARAMETERS:
        return (f"{versions('transformers')}: Qwen3VLModel.get_rope_index takes ({', '.join(found[1:])}), the "
                f"stand-in was written for ({', '.join(ROPE_INDEX_PARAMETERS[1:])})")
    needs = set(re.findall(r"self\.(\w+)", inspect.getsource(model.get_rope_index)))
    if not needs <= {"config", "get_vision_position_ids"}:
        return (f"{versions('transformers')}: Qwen3VLModel.get_rope_index reads "
                f"{', '.join(sorted('self.' + n for n in needs - {'config', 'get_vision_position_ids'}))}")
    if not re.search(r"if position_ids is None:\s+position_ids = self\.compute_3d_position_ids\(",
                     inspect.getsource(model.forward)):
        return f"{versions('transformers')}: Qwen3VLModel.forward no longer takes given position_ids instead of its own"
    return None


def partial_checkpointing_problem() -> str | None:
    """checkpointed_layers < 1 switches layers one by one through the flag that transformers'
    GradientCheckpointingLayer reads at every call."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return f"{versions('transformers')} has no GradientCheckpointingLayer"
    decoder_layer = getattr(modeling_qwen3_vl, "Qwen3VLTextDecoderLayer", None)
    if decoder_layer is None or not issubclass(decoder_layer, GradientCheckpointingLayer):
        return f"{versions('transformers')}: Qwen3-VL's decoder layers are not GradientCheckpointingLayers"
    if "self.gradient_checkpointing" not in inspect.getsource(GradientCheckpointingLayer.__call__):
        return f"{versions('transformers')}: GradientCheckpointingLayer no longer reads a per-layer flag"
    return None


def offload_problem() -> str | None:
    """offload_activations binds OffloadedCheckpoint as each decoder layer's `_gradient_checkpointing_func`, which
    transformers' GradientCheckpointingLayer calls as func(run, hidden_states) with the other inputs bound in run."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    source = inspect.getsource(GradientCheckpointingLayer.__call__)
    if "self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)" not in source:
        return (f"{versions('transformers')}: GradientCheckpointingLayer no longer calls "
                "_gradient_checkpointing_func(partial(forward, **kwargs), *args)")
    return None


def cpu_training_layout_problem() -> str | None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout at the first
    no-grad forward, unless the layer's `support_avx512bf16_for_cpu` is off (keep_4bit_layers_differentiable turns
    it off). A bitsandbytes that repacks under another switch would silently stop the gradients on such a CPU."""
    if gpu_available():
        return None
    import bitsandbytes

    source = inspect.getsource(bitsandbytes.nn.Linear4bit.forward)
    if "avx512" in source and "support_avx512bf16_for_cpu" not in source:
        return (f"{versions('bitsandbytes')} repacks 4-bit weights for CPU inference under a switch this trainer "
                "does not know; training on this CPU could silently stop the gradients. Use bitsandbytes==0.50.2 "
                "(requirements.txt) or a GPU")
    return None


@dataclass(frozen=True)
class SpeedPatch:
    key: str  # the config key that switches it
    name: str  # in log lines
    cost: str  # what stepping aside costs, measured (bench/RESULTS.md)
    problem: Callable[[], str | None]  # why it cannot apply with the installed libraries; None when it can


SPEED_PATCHES = (
    SpeedPatch("liger_kernels", "Liger kernels (RoPE, RMSNorm, SwiGLU)",
               "about 20% fewer samples/s at 448x448 images and 43% at 896x896 (H100)", liger_problem),
    SpeedPatch("batched_vision_attention", "batched vision attention",
               "the vision tower makes one attention call per image (about 6% fewer samples/s at 448x448, H100)",
               vision_attention_problem),
    SpeedPatch("fused_lora_forward", "fused LoRA forward",
               "peft's own LoRA forward, one more pass over each layer's output", fused_lora_problem),
    SpeedPatch("fused_lora_dropout", "LoRA dropout and down-projection in one kernel",
               "torch's dropout kernel and a separate GEMM per LoRA layer: the dropped input and its mask written and "
               "read again, forward and backward", lora_dropout_kernel_problem),
    SpeedPatch("answer_only_logits", "answer-only logits",
               "the model's own loss over every position's 151,936 logits (more memory, a smaller batch)",
               answer_only_logits_problem),
    SpeedPatch("positions_in_dataloader", "M-RoPE positions in the dataloader",
               "the forward computes the positions sample by sample on the GPU, about 9 host synchronisations a "
               "sample (870 a step at 448x448 and batch 92 on the 8B shape, H200 profile)",
               positions_in_dataloader_problem),
    SpeedPatch("vision_without_autocast", "vision tower without autocast",
               "autocast's float32 LayerNorms keep the vision tower's activations in float32, cast to bf16 and back at "
               "every layer: about 5% fewer samples/s at 448x448 and 3.5% at 896x896 (H200)", vision_autocast_problem),
    SpeedPatch("deepstack_by_index", "deepstack features added by index",
               "3 host synchronisations in the forward and up to 9 in the backward (boolean-mask indexing in the "
               "first 3 decoder layers; H200 sync count), each leaving the GPU to wait on the host", deepstack_problem),
    SpeedPatch("drop_padding_mask", "right-padded batches without a padding mask",
               "a masked attention kernel over the whole square instead of the causal one, on key/value heads "
               "copied 4 times: about 3.5% fewer samples/s at 448x448 and 8% at 896x896 (H200)", padding_mask_problem),
)


@dataclass(frozen=True)
class PatchDecision:
    on: bool
    note: str  # "on", "off (liger_kernels: false)", "off: <why>; <cost>"


# Measured: FSDP-QLoRA with 2 processes on 2 H200s stopped in the first evaluation with "an illegal memory access was
# encountered"; with CUDA_LAUNCH_BLOCKING=1 it is fused_lora_4bit_forward reading lora_B.weight, a sharded flat
# parameter that only lora_B's own forward (which it skips) gathers first (bench/RESULTS.md, 2026-11-30).
FUSED_LORA_UNDER_FSDP = ("under FSDP the LoRA weights are sharded and gathered by each LoRA module's own forward, "
                         "which the fused forward skips (an illegal memory access on 2 H200s, 2026-11-30)")


def plan_speed_patches(cfg: StageConfig, fsdp: bool = False) -> tuple[dict[str, PatchDecision], list[str]]:
    """Decide every speed patch from the config and the installed libraries, before the model loads. Returns the
    decisions by config key, and the problems (a patch set to true that cannot apply), one line each, naming the key.
    Also checks what checkpointed_layers < 1 and training on a CPU rely on. `fsdp`: launched with an FSDP config."""
    decisions, problems = {}, []
    for patch in SPEED_PATCHES:
        setting = getattr(cfg, patch.key)
        if setting is False:
            decisions[patch.key] = PatchDecision(False, f"off ({patch.key}: false)")
            continue
        why = patch.problem() or (FUSED_LORA_UNDER_FSDP if fsdp and patch.key == "fused_lora_forward" else None)
        fused_forward = decisions.get("fused_lora_forward")
        if why is None and patch.key == "fused_lora_dropout" and not (fused_forward and fused_forward.on):
            decisions[patch.key] = PatchDecision(False, "off: it runs inside the fused LoRA forward, which is off")
        elif why is None and patch.key == "vision_without_autocast" and cfg.fp32_upcast:  # it would compute in fp32
            decisions[patch.key] = PatchDecision(False, "off: fp32_upcast: true keeps the vision tower's norms in "
                                                        "float32, for autocast to compute in")
        elif why is None:
            decisions[patch.key] = PatchDecision(True, "on")
        elif setting is True:
            problems.append(f"{patch.key}: true, but {patch.name} cannot run here: {why}. Set {patch.key}: auto to "
                            "go on without it")
        else:
            cost = "" if why.startswith("no GPU") else f"; cost: {patch.cost}"  # a CPU run loses nothing by it
            decisions[patch.key] = PatchDecision(False, f"off: {why}{cost}")
    if cfg.gradient_checkpointing and cfg.checkpointed_layers < 1:
        why = partial_checkpointing_problem()
        if why:
            problems.append(f"checkpointed_layers: {cfg.checkpointed_layers:g} needs per-layer checkpointing: {why}. "
                            "Set checkpointed_layers: 1.0")
    if cfg.offload_activations:
        why = ("it offloads what gradient checkpointing keeps; set gradient_checkpointing: true"
               if not cfg.gradient_checkpointing else
               "not tested under FSDP; use it with one GPU or DDP" if fsdp else offload_problem())
        if why:
            problems.append(f"offload_activations: true cannot run here: {why}. Or set offload_activations: false")
        decisions["offload_activations"] = PatchDecision(True, "on")
    else:
        decisions["offload_activations"] = PatchDecision(False, "off (offload_activations: false)")
    why = cpu_training_layout_problem()
    if why:
        problems.append(f"training on the CPU: {why}")
    return decisions, problems


def describe_speed_patches(decisions: dict[str, PatchDecision]) -> dict[str, str]:
    """For stage_metrics.json: {config key: 'on' | 'off...'}."""
    return {key: d.note for key, d in decisions.items()}


# ---------------------------------------------------------------------------------------------------------------------
# The 4-bit base: made trainable, with gradient checkpointing on the chosen layers
# ---------------------------------------------------------------------------------------------------------------------


def keep_4bit_layers_differentiable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights into an inference-only layout at the first
    no-grad forward (our first_eval_loss). From then on it computes them with a kernel that has no backward,
    and gradients silently stop flowing through the frozen layers. Keep the trainable layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_gradient_checkpointing(model, cfg: StageConfig) -> tuple[int, int]:
    """The first `streamed_layers` of the language model's decoder layers streamed (their saved tensors in CPU
    memory), and non-reentrant checkpointing on `checkpointed_layers` of the others (evenly spread), none on the
    rest; returns (checkpointed, streamed) counts. The vision tower is not trained (LoRA targets the language model)
    and runs without autograd, so it has nothing to recompute."""
    layers = len(language_layers(model))
    streamed = 0 if cfg.streamed_layers == "auto" else round(cfg.streamed_layers * layers)  # auto: the plan's
    if streamed:
        why = streaming_problem(model)
        if why:
            raise ConfigError(f"streamed_layers: {cfg.streamed_layers:g} was checked and {why}; set streamed_layers: 0")
    checkpointed = round(cfg.checkpointed_layers * (layers - streamed)) if cfg.gradient_checkpointing else 0
    return set_checkpointed_layers(model, checkpointed, streamed=streamed), streamed


def streaming_problem(model) -> str | None:
    """Why the layers of `model` cannot be streamed here, or None. On a GPU the copies, streams and events run
    once on a small model against keeping the tensors (a copy on a stream that is not waited for shows only
    there); on a CPU the bookkeeping is what the tests check."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    from curriculum.activation_streaming import check_streaming

    why = check_streaming(device)
    return f"on {device} {why}" if why else None


def language_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.language_model.layers


def set_checkpointed_layers(model, n: int, offload: bool = False, streamed: int = 0) -> int:
    """Gradient checkpointing (non-reentrant) on n of the language model's decoder layers, evenly spread over those
    not streamed, and with `offload` their inputs kept in CPU memory (offload_checkpointed_activations); none with
    n = 0. The first `streamed` layers keep what they save in CPU memory instead and do not recompute
    (curriculum/activation_streaming.py). Every call sets every layer anew (torch's checkpoint function back
    first), so a plan can try one setting after another. Returns n."""
    from curriculum.activation_streaming import stream_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = language_layers(model)
    stream_layers(model, layers, streamed)
    if not n:
        base.gradient_checkpointing_disable()
        return 0
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rest = len(layers) - streamed
    chosen = {streamed + math.floor(i * rest / n) for i in range(min(n, rest))}
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen  # read by transformers' GradientCheckpointingLayer per call
    if offload:
        offload_checkpointed_activations(model)
    return len(chosen)


class OffloadedCheckpoint:
    """Gradient checkpointing whose one saved tensor, the layer's input, waits in pinned CPU memory between the
    forward and the backward instead of on the GPU (what Unsloth's "unsloth" checkpointing does; written here from
    torch's documented pieces). With every decoder layer checkpointed, those inputs are most of what a step keeps:
    36 x batch x tokens x hidden x 2 bytes, 7 GiB at W448 and batch 96 on the 8B shape.

    The copies run on a side stream: the copy out overlaps the layer's forward, and in the backward the copy in of
    the layer below starts before this layer recomputes, so each waits on the PCIe bus as little as it can. The
    recomputation replays the forward's RNG state (LoRA dropout draws the same mask) and autocast state.
    Bound per decoder layer as transformers' `_gradient_checkpointing_func(run, hidden_states)`."""

    def __init__(self):
        self.streams = {}  # device -> side stream for the copies
        self.pending = None  # weak reference to the last layer input saved: its backward comes next
        self.function = None

    def stream(self, device):
        import torch

        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def __call__(self, run, hidden_states, *args, **kwargs):
        import torch
        from torch.utils.checkpoint import checkpoint

        if kwargs or not torch.is_grad_enabled() or not hidden_states.requires_grad:
            # nothing to offload (evaluation), or a call shape this was not written for: torch's own
            return checkpoint(run, hidden_states, *args, use_reentrant=False, **kwargs)
        if self.function is None:  # built on first use: importing this module does not import torch
            self.function = _offloaded_layer_function()
        return self.function.apply(self, run, hidden_states, *args)

    def copy_out(self, hidden_states):
        import torch

        if hidden_states.device.type != "cuda":  # a CPU run (tests): a copy, so the logic is the same
            return hidden_states.detach().clone()
        host = torch.empty(hidden_states.shape, dtype=hidden_states.dtype, pin_memory=True)
        side = self.stream(hidden_states.device)
        side.wait_stream(torch.cuda.current_stream(hidden_states.device))
        with torch.cuda.stream(side):
            host.copy_(hidden_states, non_blocking=True)
        hidden_states.record_stream(side)  # its GPU memory is not reused before the copy has read it
        return host

    def copy_in(self, host, device):
        """Start copying a saved input back to `device`; returns (tensor, event to wait on)."""
        import torch

        if device.type != "cuda":
            return host, None
        side = self.stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # the buffer it lands in is free on the main stream
        with torch.cuda.stream(side):
            back = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        back.record_stream(torch.cuda.current_stream(device))
        return back, done


class SavedInput:
    """One checkpointed layer's input between its forward and backward: in pinned CPU memory, or already on its way
    back (`prefetched`)."""

    def __init__(self, host, device):
        self.host, self.device, self.prefetched = host, device, None


def _offloaded_layer_function():
    import torch

    class OffloadedLayer(torch.autograd.Function):
        @staticmethod
        def forward(ctx, offload, run, hidden_states, *args):
            ctx.offload, ctx.run, ctx.args = offload, run, args
            device = hidden_states.device
            ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
            ctx.saved = SavedInput(offload.copy_out(hidden_states), device)
            # the layer below ran just before this one, so its backward comes right after this one's (weak: a forward
            # that is never backpropagated, like batch_size: auto's probes, leaves nothing behind)
            ctx.below, offload.pending = offload.pending, weakref.ref(ctx.saved)
            with torch.no_grad():
                return run(hidden_states, *args)

        @staticmethod
        def backward(ctx, *grads):
            offload, saved = ctx.offload, ctx.saved
            hidden_states, done = saved.prefetched or offload.copy_in(saved.host, saved.device)
            below = ctx.below() if ctx.below is not None else None
            if below is not None and below.prefetched is None:  # its copy in overlaps this layer's recomputation
                below.prefetched = offload.copy_in(below.host, below.device)
            if done is not None:
                torch.cuda.current_stream(saved.device).wait_event(done)
            hidden_states = hidden_states.detach().requires_grad_(True)
            offload.pending = None
            with torch.random.fork_rng(devices=[saved.device] if saved.device.type == "cuda" else []):
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], saved.device)
                with torch.enable_grad(), torch.autocast(saved.device.type, enabled=ctx.autocast[0],
                                                         dtype=ctx.autocast[1]):
                    out = ctx.run(hidden_states, *ctx.args)
            outputs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outputs, grads, strict=False)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            n_args = len(ctx.args)
            ctx.saved = ctx.run = ctx.args = None
            return (None, None, hidden_states.grad) + (None,) * n_args

    return OffloadedLayer


def offload_checkpointed_activations(model) -> int:
    """Bind OffloadedCheckpoint to the language model's checkpointed decoder layers; returns how many."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    offload = OffloadedCheckpoint()
    layers = [layer for layer in base.model.language_model.layers if layer.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = offload
    return len(layers)


# ---------------------------------------------------------------------------------------------------------------------
# The patches bound once the adapter is on the model
# ---------------------------------------------------------------------------------------------------------------------


def apply_liger_kernels(model) -> None:
    """Liger's fused RoPE, RMSNorm and SwiGLU for Qwen3-VL. Its fused cross-entropy stays off (the answer-only loss
    already skips the prompt's logits). Its SwiGLU is bound to each decoder layer's MLP as Liger binds it for other
    models (the module's own, 4-bit, projections stay; only silu(gate) * up becomes one kernel); Liger's qwen3_vl
    entry point does not offer it for a loaded model."""
    from liger_kernel.transformers import LigerSwiGLUMLP, apply_liger_kernel_to_qwen3_vl

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    apply_liger_kernel_to_qwen3_vl(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
                                   fused_linear_cross_entropy=False, model=base)
    text_config = getattr(base.config, "text_config", base.config)
    if text_config.hidden_act in ("silu", "swish"):  # LigerSwiGLUMLP.forward: down(silu_mul(gate(x), up(x)))
        for layer in base.model.language_model.layers:
            layer.mlp.forward = types.MethodType(LigerSwiGLUMLP.forward, layer.mlp)


def run_vision_tower_without_autocast(model) -> str | None:
    """The vision tower's forward with autocast off: it trains nothing (LoRA targets the language model) and its
    weights are already bf16, but under the Trainer's autocast its LayerNorms (on autocast's float32 list) return
    float32, so its whole residual stream runs in float32 and every 4-bit layer casts its input to bf16 and its
    output back (bitsandbytes returns the input's dtype): 50176 x 4304 tensors cast twice a layer at 448x448,
    batch 64. Without autocast the tower computes as it does at inference (generate runs no autocast). Returns why
    it stepped aside, or None once bound."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual = getattr(getattr(base, "model", None), "visual", None)
    if visual is None:
        return "the model has no vision tower at model.visual"
    if any(p.requires_grad for p in visual.parameters()):
        return "LoRA trains modules of the vision tower (target_modules): they keep autocast"
    floating = {p.dtype for p in visual.parameters() if p.is_floating_point()}
    if floating - {torch.bfloat16, torch.float16}:
        return f"the vision tower holds {', '.join(sorted(str(d) for d in floating))} weights"
    forward, device_type = visual.forward, visual.device.type

    def forward_without_autocast(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return forward(*args, **kwargs)

    visual.forward = forward_without_autocast
    return None


def deepstack_by_index(self, hidden_states, visual_pos_masks, visual_embeds):
    """Qwen3VLTextModel._deepstack_process without a host synchronisation: the image tokens' hidden states get the
    deepstack features added by index_add at the indices of the mask, found by nonzero_static with the count the
    features' own shape gives (plain boolean indexing has to read the count on the host, and so does its
    backward). Indices in the mask's row-major order, as boolean indexing takes them; one add per element, so the
    same result."""
    import torch

    visual_pos_masks = visual_pos_masks.to(hidden_states.device)
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    index = torch.nonzero_static(visual_pos_masks.reshape(-1), size=visual_embeds.shape[0]).squeeze(1)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return flat.index_add(0, index, visual_embeds).view(hidden_states.shape)


def add_deepstack_by_index(model) -> int:
    """Bind deepstack_by_index to the model's Qwen3-VL text models; returns how many."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    text_models = [m for m in model.modules() if isinstance(m, Qwen3VLTextModel)]
    for text_model in text_models:
        text_model._deepstack_process = types.MethodType(deepstack_by_index, text_model)
    return len(text_models)


def fused_lora_4bit_forward(self, x, *args, **kwargs):
    """peft's LoRA forward on a 4-bit layer (peft.tuners.lora.bnb.Linear4bit.forward), for its common case, in fewer
    passes over the output: result + (x A^T)(s B)^T as one addmm (the add happens in the GEMM's epilogue, the
    scaling s on the small B instead of on the output) and without peft's `result.clone()`, which guards an
    in-place add that peft no longer does (the base output is not saved for backward either). Anything else
    (adapters off, merged, several or mixed adapters, DoRA and other variants, a LoRA bias) goes to peft's own."""
    import torch

    name = "default"
    if (args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [name]
            or name in getattr(self, "lora_variant", {}) or getattr(self, "lora_bias", {}).get(name)
            or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    autocast = torch.is_autocast_enabled(x.device.type)  # without it, as peft: the LoRA product in the adapter's dtype
    dropout = self.lora_dropout[name]
    h = None
    if self.__dict__.get("lora_down_kernel") is not None and autocast and dropout.training and lora_A.bias is None \
            and isinstance(dropout, torch.nn.Dropout):  # fused_lora_dropout: None where its kernels do not apply
        # in autocast's dtype, as autocast's linear would take it (float32 x would run the kernel's slow float32 path)
        h = self.lora_down_kernel(x.to(torch.get_autocast_dtype(x.device.type)), lora_A.weight, dropout.p)
    if h is None:
        h = lora_A(dropout(x if autocast else x.to(lora_A.weight.dtype)))
    scaled_B = lora_B.weight * self.scaling[name]  # (out, r): tiny
    if not autocast:  # ... and the sum in the base layer's
        h, scaled_B = h.to(result.dtype), scaled_B.to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_B.t())
    return out.view(result.shape)


def check_lora_dropout_kernel(device) -> str | None:
    """Run curriculum/lora_dropout.py's kernels once on this device against torch with the same mask (forward, and
    the gradients of x and A), at a shape with ragged row and column blocks; None when they agree, else what
    differs. A Triton kernel compiles for the GPU it meets: this is where a GPU, driver or Triton it was not tried
    on shows, before any training step."""
    import torch

    from curriculum import lora_dropout

    T, K, r, p = 301, 320, 4, 0.25
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, K, device=device, generator=g).to(torch.bfloat16).requires_grad_(True)
    a = (torch.randn(r, K, device=device, generator=g) * 0.05).requires_grad_(True)
    dh = torch.randn(T, r, device=device, generator=g).to(torch.bfloat16)
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    try:
        h = lora_dropout.lora_down_with_dropout(x, a, p)
        if h is None:
            return f"the kernel refused the check's input ({lora_dropout.kernel_problem(x, a, p)})"
        h.backward(dh)
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        keep = lora_dropout.dropout_keep_mask(lora_dropout.draw_seed(device), T, K, p, device)
    except Exception as err:  # a kernel that does not compile or launch here: the reason is the finding
        return f"the kernel did not run ({first_line(err)})"
    kept = keep.float().mean().item()
    if abs(kept - (1 - p)) > 0.02:
        return f"its mask keeps {kept:.3f} of the elements, not {1 - p}"
    xr, ar = x.detach().clone().requires_grad_(True), a.detach().clone().requires_grad_(True)
    dropped = (xr.float() * keep / (1 - p)).to(torch.bfloat16)
    reference = (dropped.float() @ ar.to(torch.bfloat16).float().t())
    reference.backward(dh.float())
    for what, got, want in (("h", h, reference), ("dx", x.grad, xr.grad), ("dA", a.grad, ar.grad)):
        error = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if not error < 2e-2:  # bf16 outputs carry 8 bits; a wrong mask or product is off by far more
            return f"its {what} differs from torch's with the same mask (by {error:.1%} of its largest value)"
    return None


def bind_lora_dropout_kernel(model) -> int:
    """Give every LoRA layer that runs fused_lora_4bit_forward the fused dropout + down-projection; returns how
    many."""
    from curriculum.lora_dropout import lora_down_with_dropout

    layers = [m for m in model.modules() if "forward" in m.__dict__ and getattr(m.forward, "__func__", None) is
              fused_lora_4bit_forward]
    for layer in layers:
        layer.lora_down_kernel = lora_down_with_dropout
    return len(layers)


def fuse_lora_updates(model) -> int:
    """Bind fused_lora_4bit_forward to every LoRA layer on a 4-bit base layer; returns how many. Layers with an
    accelerate hook (a model dispatched over several devices) keep peft's forward."""
    from peft.tuners.lora.bnb import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit) and not hasattr(m, "_hf_hook")]
    for layer in layers:
        layer.forward = types.MethodType(fused_lora_4bit_forward, layer)
    return len(layers)


class MRopePositions:
    """A collated batch's M-RoPE position ids (3 x batch x length), by transformers' own
    Qwen3VLModel.get_rope_index run on the batch's CPU tensors, in the dataloader workers. Inside the forward it
    runs sample by sample on the GPU, each sample's boolean masks, `.item()` and `.tolist()` a host
    synchronisation (about 9 a sample), with the GPU idle in between. get_rope_index reads nothing of the model
    but its config (positions_in_dataloader_problem checks that), and the forward takes the batch's position_ids
    in place of its own. None for a batch without images (the forward's own arange then)."""

    def __init__(self, config):
        self.config = config

    def get_vision_position_ids(self, *args, **kwargs):  # what get_rope_index calls on its model
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, batch: dict):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        if batch.get("image_grid_thw") is None:
            return None
        positions, _ = Qwen3VLModel.get_rope_index(self, batch["input_ids"], batch["mm_token_type_ids"],
                                                   image_grid_thw=batch["image_grid_thw"],
                                                   attention_mask=batch["attention_mask"])
        return positions


def image_groups(cu_seqlens) -> list[tuple[int, Any]]:
    """The images of a vision batch grouped by token count: (length, index of their tokens, or None when every image
    has that length). Computed once per forward (one device-to-host copy) and kept on the cu_seqlens tensor, which
    the vision model passes unchanged to each of its blocks."""
    import torch

    cached = getattr(cu_seqlens, "_image_groups", None)
    if cached is not None:
        return cached
    bounds = cu_seqlens.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:], strict=False):
        starts_by_length.setdefault(end - start, []).append(start)
    if len(starts_by_length) == 1:
        groups = [(next(iter(starts_by_length)), None)]
    else:
        groups = [(length, (torch.tensor(starts, device=cu_seqlens.device)[:, None]
                            + torch.arange(length, device=cu_seqlens.device)).flatten())
                  for length, starts in starts_by_length.items()]
    cu_seqlens._image_groups = groups
    return groups


def batched_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                                     **kwargs):
    """Qwen3VLVisionAttention.forward (transformers 5.x) with the images of one size attended in one
    scaled_dot_product_attention call (batch = images) rather than one call each. Bound per module by
    batch_vision_attention where the model runs SDPA."""
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = modeling_qwen3_vl.apply_rotary_pos_emb_vision(q, k, cos, sin)  # looked up now: Liger may replace it
    out = None
    for length, index in image_groups(cu_seqlens):
        qs, ks, vs = ((t if index is None else t[index]).reshape(-1, length, self.num_heads, t.shape[-1])
                      .transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scaling).transpose(1, 2).reshape(-1, *v.shape[1:])
        if index is None:
            out = o
        else:
            out = torch.empty_like(v) if out is None else out
            out[index] = o
    return self.proj(out.reshape(n, -1))


def batch_vision_attention(model) -> int:
    """Bind batched_vision_attention_forward to the vision tower's attention modules that run SDPA (transformers'
    default; FlashAttention and eager keep their own); returns how many."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    modules = [m for m in model.modules() if isinstance(m, Qwen3VLVisionAttention)
               and m.config._attn_implementation == "sdpa"]
    for module in modules:
        module.forward = types.MethodType(batched_vision_attention_forward, module)
    return len(modules)


def apply_speed_patches(model, cfg: StageConfig, decisions: dict[str, PatchDecision] | None = None,
                        say: Callable[[str], None] = print) -> dict[str, PatchDecision]:
    """Bind the patches that the plan turned on, to a model that already carries its adapter; one log line per
    patch (`Speed patch <name>: ...`). Returns the decisions, with what binding found (a model that is not Qwen3-VL
    gets no Liger kernels; one that runs FlashAttention keeps its own vision attention)."""
    if decisions is None:
        decisions, problems = plan_speed_patches(cfg)
        if problems:
            raise ConfigError("\n".join(problems))
    decisions = dict(decisions)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", "?")
    if decisions["liger_kernels"].on and model_type != "qwen3_vl":
        if cfg.liger_kernels is True:
            raise ConfigError(f"liger_kernels: true is for Qwen3-VL; {cfg.model_name_or_path} is {model_type}")
        decisions["liger_kernels"] = PatchDecision(False, f"off: the model is {model_type}, not qwen3_vl")
    if decisions["liger_kernels"].on:
        apply_liger_kernels(model)
    if decisions["positions_in_dataloader"].on and model_type != "qwen3_vl":
        if cfg.positions_in_dataloader is True:
            raise ConfigError(f"positions_in_dataloader: true is for Qwen3-VL; {cfg.model_name_or_path} is "
                              f"{model_type}")
        decisions["positions_in_dataloader"] = PatchDecision(False, f"off: the model is {model_type}, not qwen3_vl")
    if decisions["batched_vision_attention"].on:
        bound = batch_vision_attention(model)
        if not bound:
            decisions["batched_vision_attention"] = PatchDecision(
                False, "off: the vision tower does not run SDPA (FlashAttention or eager keep their own)")
        else:
            decisions["batched_vision_attention"] = PatchDecision(True, f"on ({bound} vision attention modules)")
    if decisions["fused_lora_forward"].on:
        decisions["fused_lora_forward"] = PatchDecision(True, f"on ({fuse_lora_updates(model)} 4-bit LoRA layers)")
    if decisions["fused_lora_dropout"].on:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        why = check_lora_dropout_kernel(device)
        if why is not None and cfg.fused_lora_dropout is True:
            raise ConfigError(f"fused_lora_dropout: true, but its check on {device} failed: {why}. Set "
                              "fused_lora_dropout: auto to go on without it")
        decisions["fused_lora_dropout"] = (
            PatchDecision(False, f"off: its check on {device} failed: {why}") if why is not None else
            PatchDecision(True, f"on ({bind_lora_dropout_kernel(model)} LoRA layers; checked against torch on "
                                f"{device})"))
    if decisions["deepstack_by_index"].on:
        bound = add_deepstack_by_index(model)
        decisions["deepstack_by_index"] = PatchDecision(bool(bound), f"on ({bound} text model)" if bound else
                                                        "off: the model has no Qwen3-VL text model")
    if decisions["vision_without_autocast"].on:
        why = run_vision_tower_without_autocast(model)
        if why is not None and cfg.vision_without_autocast is True:
            raise ConfigError(f"vision_without_autocast: true, but {why}. Set vision_without_autocast: auto")
        if why is not None:
            decisions["vision_without_autocast"] = PatchDecision(False, f"off: {why}")
    if decisions["offload_activations"].on:
        n = offload_checkpointed_activations(model)
        where = "pinned CPU memory" if gpu_available() else "a copy (a CPU run: nothing to save)"
        decisions["offload_activations"] = PatchDecision(True, f"on ({n} checkpointed decoder layers keep their "
                                                               f"inputs in {where})")
    for patch in SPEED_PATCHES:
        say(f"Speed patch {patch.name}: {decisions[patch.key].note}")
    say(f"Speed patch activation offload: {decisions['offload_activations'].note}")
    return decisions
