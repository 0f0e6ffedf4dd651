"""Curriculum QLoRA fine-tuning of Qwen3-VL: one stage per command, the *same* LoRA adapter throughout.

    python train_qlora_qwen3vl.py configs/exp4_stage1.yaml                 # stage 1: a new adapter
    python train_qlora_qwen3vl.py configs/exp4_stage2.yaml                 # stage 2: continues stage 1's
    python train_qlora_qwen3vl.py configs/demo/stage1.yaml --set lr=1e-3   # any key, overridden
    python train_qlora_qwen3vl.py configs/demo/stage1.yaml --check         # validate config + data only

The base model is loaded once in 4-bit NF4 and prepared for k-bit training once. Stage 1 wraps it
with a fresh LoRA adapter; a later stage reopens the previous stage's adapter *for training*
(`PeftModel.from_pretrained(..., is_trainable=True)`), never merges it, never prepares the base a
second time and never stacks a second adapter on top. Before the first step the script proves it:
only LoRA parameters train, and their count equals the count computed from the model's shapes.

Layout: config -> data -> model and adapter -> train -> save, each a section below; `train_stage()` and
`main()` last. The helpers it calls live in curriculum/ (reading data files, adapter files and hashes, evaluation,
speed patches, faults, processes), none of which imports this file back.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

# torch, transformers and peft are imported inside the functions that use them, not here: `--help`, a config error
# and the scripts and tests that import this file for its config do not wait seconds for them.
from curriculum import adapter_files, faults, forgetting, speed, stage_folder
from curriculum.adapter_files import ADAPTER_WEIGHTS, OPTIMIZER_MOMENTS
from curriculum.answer_loss import IGNORE_INDEX, answer_only_loss, answer_only_loss_trainer
from curriculum.base_model import (
    align_special_tokens,
    bnb_config,
    load_processor,
    quant_storage_dtype,
    resolve_model_path,
)
from curriculum.batch_size import choose_batch_size
from curriculum.data_files import check_split, split_config_problems, split_hashes, split_sha256
from curriculum.errors import ConfigError, CurriculumError, DiskFull, StageStopped, out_of_memory_message
from curriculum.evaluation import evaluate_dev_split, evaluate_records, write_predictions
from curriculum.faults import STAGE_START
from curriculum.hashing import sha256_file
from curriculum.plan import Plan, plan_step
from curriculum.plots import write_stage_plots
from curriculum.processes import (
    check_processes_agree,
    cpu_threads_wait_passively,
    fsdp_config_problems,
    fsdp_enabled,
    gather_from_processes,
    gpu_available,
    is_main_process,
    one_gpu_per_process,
    print_main,
    processes,
    runtime,
    training_device,
)
from curriculum.records import Record, answer_token_ids, prompt_and_images
from curriculum.scoring import metrics_table
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS
from curriculum.trainer_callbacks import before_first_step, make_log_callbacks, tensorboard_callback
from curriculum.typed_yaml import parse_args, read_yaml_dataclass

# isort: off
# Read as tq.NAME by the tests (they lived here before curriculum/ did); the recipe itself does not use them.
from curriculum.adapter_files import (ADAPTER_CONFIG, adapter_file_problems, expected_lora_param_count,  # noqa: F401
                                      file_adapter_sha256, loaded_adapter_sha256, read_adapter_file, read_adapter_lora,
                                      save_adapter_under_fsdp)
from curriculum.answer_loss import answer_loss, answer_positions  # noqa: F401
from curriculum.base_model import TINY_MODEL_NAME, from_pretrained_checked  # noqa: F401
from curriculum.data_files import (IMAGE_CHECK_CACHE, drop_overlong, image_token_count, inspect_images,  # noqa: F401
                                   load_records, read_records, sample_lengths)
from curriculum.records import format_answer, format_question, with_image_settings  # noqa: F401
from curriculum.stage_folder import previous_stage_dir  # noqa: F401
from curriculum.typed_yaml import apply_overrides  # noqa: F401
# isort: on

cpu_threads_wait_passively()  # before torch loads: OpenMP reads it then (curriculum/processes.py says why)
speed.quiet_optional_backend_warnings()  # before bitsandbytes and Liger import: their optional backends' warnings
# peft calls a transformers method that transformers 5 renamed; the warning is about peft, not about you.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)


# ---------------------------------------------------------------------------------------------------------------------
# Config: typed dataclasses from YAML; unknown keys rejected with the closest valid key
# ---------------------------------------------------------------------------------------------------------------------


def calls_it(key: str) -> str:
    """The message for a key other tools name otherwise (typed_yaml's KNOWN_ELSEWHERE)."""
    if "." not in key:
        return f"this tool calls it '{key}'"
    section, leaf = key.split(".", 1)
    return f"this tool calls it '{key}' (in YAML: `{section}: {{{leaf}: ...}}`)"


@dataclass
class LoraSettings:
    KNOWN_ELSEWHERE: ClassVar[dict[str, str]] = {
        "lora_r": calls_it("lora.r"), "rank": calls_it("lora.r"), "lora_rank": calls_it("lora.r"),
        "lora_alpha": calls_it("lora.alpha"), "lora_dropout": calls_it("lora.dropout"),
        "lora_target_modules": calls_it("lora.target_modules")}

    r: int = 4
    """LoRA rank. Must be the same in every stage of a curriculum (it is the same adapter)."""
    alpha: int = 8
    """LoRA scaling numerator (`lora_alpha`); the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get LoRA. q/k/v/o_proj match the language model only (the vision tower's are attn.qkv/proj)."""


@dataclass
class QuantizationSettings:
    KNOWN_ELSEWHERE: ClassVar[dict[str, str]] = {
        f"bnb_4bit_{k}": calls_it(f"quantization.{v}") for k, v in (
            ("quant_type", "quant_type"), ("compute_dtype", "compute_dtype"), ("use_double_quant", "double_quant"),
            ("quant_storage", "quant_storage"))}

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """bitsandbytes 4-bit data type of the frozen base weights."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype that the 4-bit weights are de-quantized to for matrix products."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per parameter)."""
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"
    """dtype the packed 4-bit weights are stored in. FSDP shards only floating-point tensors, so under FSDP it
    must be the compute dtype; `auto` picks that under FSDP and uint8 otherwise."""


@dataclass
class ReplaySettings:
    """Earlier stages' training records mixed into this stage's (curriculum/forgetting.py)."""

    fraction: float = 0.0
    """Share of the mixed training set that is replayed: 0.2 adds round(0.2 / 0.8 x N) records to this stage's N
    (50 to 200), drawn at random (seeded by `seed`) from the pooled training records of `stages`, each read from
    the file that stage recorded (its SHA-256 must still match). 0: off. In [0, 1)."""
    stages: Literal["all"] | list[int] = "all"
    """The earlier stages to replay, by stage number: `all` of the lineage (the prev_checkpoint chain), or a list
    such as [1]."""


@dataclass
class DataColumns:
    """Where each field of a record is, by column name (a Hugging Face dataset) or key (a JSONL line)."""

    id: str = "id"
    """The record's id, named in errors and predictions."""
    question: str = "question"
    """The question text."""
    type: str = "type"
    """The question type: single_choice, numeric, multi_label or free_text. Without this column (or where a row's is
    null) the type is inferred per row; see question_type."""
    options: str = "options"
    """The answer options (a list of strings; empty or null for numeric and free_text)."""
    answer: str = "answer"
    """The gold answer: for options their letter(s) (a list, or text: `A, C`), 0-based index or text; a number; or
    a short text (free_text: what the model is trained to answer)."""
    references: str = "answers"
    """free_text: every reference answer, a list of texts or of dicts with an `answer` (VQAv2); a match with any
    counts. The answer trained on is the answer column's, else the most common reference. May be the answer's
    column."""
    image: str = "image"
    """The image: an `Image` column (its bytes or its file), or a path relative to the data file."""
    messages: str = "messages"
    """Chat records instead: the conversation, the assistant's answer last."""
    images: str = "images"
    """Chat records: the list of (at most one) image."""


# Hugging Face's (TrainingArguments, peft, bitsandbytes) and other tools' names for keys this tool names otherwise:
# `learning_rate:` in a YAML is answered with "this tool calls it 'lr'", not with the nearest spelling.
OTHER_TOOLS_NAMES = {
    **{k: calls_it("lr") for k in ("learning_rate",)},
    **{k: calls_it("epochs") for k in ("num_train_epochs", "num_epochs")},
    **{k: calls_it("batch_size") for k in ("per_device_train_batch_size", "train_batch_size", "micro_batch_size")},
    **{k: calls_it("eval_batch_size") for k in ("per_device_eval_batch_size",)},
    **{k: calls_it("grad_accum") for k in ("gradient_accumulation_steps",)},
    **{k: calls_it("lr_scheduler") for k in ("lr_scheduler_type",)},
    **{k: calls_it("max_seq_len") for k in ("max_seq_length", "max_length", "cutoff_len", "sequence_len")},
    **{k: calls_it("model_name_or_path") for k in ("model_name", "model_id", "base_model")},
    **{k: calls_it("train_file") for k in ("dataset", "train_dataset", "data_path")},
    **{k: calls_it("eval_file") for k in ("eval_dataset", "validation_file")},
    **{k: calls_it("prev_checkpoint") for k in ("adapter_path", "peft_model_id", "resume_adapter")},
    **{k: calls_it(f"lora.{v}") for k, v in (("lora_r", "r"), ("r", "r"), ("lora_rank", "r"), ("lora_alpha", "alpha"),
                                             ("lora_dropout", "dropout"), ("target_modules", "target_modules"),
                                             ("lora_target_modules", "target_modules"))},
    **{k: calls_it(f"quantization.{v}") for k, v in (("bnb_4bit_quant_type", "quant_type"),
                                                     ("bnb_4bit_compute_dtype", "compute_dtype"),
                                                     ("bnb_4bit_use_double_quant", "double_quant"),
                                                     ("bnb_4bit_quant_storage", "quant_storage"),
                                                     ("bf16", "compute_dtype"), ("fp16", "compute_dtype"))},
    "warmup_steps": "this tool sets the warm-up as a share of the steps: 'warmup_ratio'",
    "eval_strategy": "this tool evaluates every 'eval_steps' steps (0: only before and after training)",
    "evaluation_strategy": "this tool evaluates every 'eval_steps' steps (0: only before and after training)",
    "save_strategy": "this tool checkpoints every 'save_steps' steps (0: never)",
    "resume_from_checkpoint": "not needed: run the same command again and it resumes from <output_dir>.partial "
                              "(checkpoints every 'save_steps')",
    "load_in_4bit": "not needed: the base is always loaded in 4 bit ('quantization.quant_type': nf4 or fp4)",
}


@dataclass
class StageConfig:
    KNOWN_ELSEWHERE: ClassVar[dict[str, str]] = OTHER_TOOLS_NAMES

    output_dir: str
    """Where this stage's adapter, processor, resolved config and stage_metrics.json are written."""
    train_file: str
    """Training split: a JSONL file, or a Hugging Face dataset (a .parquet or .arrow file, or a folder that
    `datasets` loads); image paths inside it are relative to its folder."""
    eval_file: str | None = None
    """Dev split (JSONL or a dataset, as train_file): evaluated before the first step, every `eval_steps`, and at
    the end."""
    test_file: str | None = None
    """Test split (JSONL or a dataset), for `python vqa_eval.py CONFIG --split test` (never used in training)."""
    columns: DataColumns = field(default_factory=DataColumns)
    """The splits' column (or key) names, where they differ from ours: `columns: {question: q, image: img}`."""
    question_type: Literal["auto", "single_choice", "numeric", "multi_label", "free_text"] = "auto"
    """auto: each row's type column, else inferred from the row (options: single_choice, or multi_label when the
    answer names several; a list of references: free_text; a number: numeric; other text: free_text) and counted
    in the split's summary. A type name: every row of the splits is that type."""
    stage: int = 1
    """Curriculum stage number: 1 makes a new adapter, >= 2 continues `prev_checkpoint`."""
    model_name_or_path: str = "Qwen/Qwen3-VL-8B-Instruct"
    """Base model: a hub id, a local directory, or `tiny-qwen3vl` (the random tiny demo model, built on first use)."""
    prev_checkpoint: str | None = None
    """Previous stage's output_dir (stage >= 2): its adapter is reopened and trained further."""
    continue_at_stage_1: bool = False
    """Let a stage-1 config continue `prev_checkpoint` (an adapter trained elsewhere). Off, stage 1 with a
    prev_checkpoint is refused: it is usually a copy-paste slip."""
    lr: float = 5e-5
    """Peak learning rate."""
    epochs: float = 1.0
    """Passes over train_file (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps for this stage; -1 runs `epochs`. Counted from 0 in every stage."""
    batch_size: int | Literal["auto"] = "auto"
    """Samples per device per forward pass. auto (needs a GPU): the largest multiple of 4 whose training step fits
    memory_budget_gib, but never so large that an epoch has fewer than 10 optimizer steps (logged, recorded as
    batch_size_chosen; effective batch = that x grad_accum x processes); with effective_batch, the plan's
    micro-batch. A number fixes it."""
    effective_batch: int | None = None
    """Samples per optimizer step, all processes together. Set, the trainer plans the step for this GPU and
    memory_budget_gib: the micro-batch (batch_size), the accumulation steps (grad_accum), how many decoder layers
    recompute (checkpointed_layers) and whether they offload their inputs (offload_activations), by measuring
    steps on the longest samples and taking the fastest that fits (logged as `Plan: ...`, recorded in
    stage_metrics.json as `plan`). Any plan is the same optimisation: the same optimizer steps, the loss a mean
    over all answer tokens of a step. Leave those four keys at their defaults. null: batch_size x grad_accum x
    processes."""
    memory_budget_gib: float | Literal["auto"] = 20.0
    """GPU memory per process that batch_size: auto and effective_batch may fill; 20 fits a 24 GB card (a GPU with
    less uses its own size). auto: what is free on this GPU when the stage starts (with the model already on it).
    90% of it is used (headroom for fragmentation and evaluation). batch_size: auto measures steps on the longest
    samples at 4 and 8; the line through them gives a size, and up to 3 more measured steps narrow it down."""
    eval_batch_size: int = 32
    """Samples per device per evaluation forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step (effective batch = batch_size x grad_accum x processes)."""
    warmup_ratio: float = 0.03
    """Fraction of this stage's steps spent warming the learning rate up from 0."""
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    eval_steps: int = 50
    """Evaluate on eval_file every this many steps (0: only before and after training)."""
    save_steps: int = 0
    """Checkpoint every this many steps into <output_dir>.partial; the same command resumes from the last one."""
    logging_steps: int = 10
    """Print the `step | loss | lr | dt | mem` line every this many steps."""
    seed: int = 42
    """Seed for LoRA initialisation, dropout and data order."""
    min_pixels: int = 4096
    """Smallest image area in pixels; smaller images are upscaled (one image token per 32x32 pixels)."""
    max_pixels: int = 200704
    """Largest image area in pixels (200704 = 448x448 -> 196 image tokens); larger images are downscaled."""
    max_seq_len: int = 2048
    """Longest sample in tokens, image tokens included. Longer samples are never truncated (see on_overlong)."""
    on_overlong: Literal["error", "skip"] = "error"
    """A sample longer than max_seq_len: `error` names it and stops; `skip` drops it and says how many."""
    on_bad_record: Literal["error", "skip"] = "error"
    """A record that is not valid (bad JSON, missing field, unknown type, answer not among the options, image
    missing, unreadable, truncated or outside the data folder): `error` lists them all and stops; `skip` drops
    them, prints how many and which, and records the list in stage_metrics.json."""
    allow_images_outside_data_dir: bool = False
    """Accept image paths that lead outside the JSONL file's folder (absolute paths or `..`). Off by default, so
    a dataset cannot make the trainer read arbitrary files."""
    system_prompt: str | None = None
    """Optional system message put before every question."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass: much less memory, ~30% more compute."""
    checkpointed_layers: float = 1.0
    """With gradient_checkpointing, the fraction of the language model's decoder layers that recompute (evenly
    spread): 1.0 all, 0.5 every other. Lower is faster and takes more memory. With effective_batch, the plan's."""
    offload_activations: bool = False
    """With gradient_checkpointing, keep each checkpointed layer's input in pinned CPU memory between the forward
    and the backward instead of on the GPU (copies overlap the compute). On the 8B shape at 448x448 and batch 96:
    17.7 -> 11.8 GiB, 6% fewer samples/s (H200); with a memory budget it lets batch_size: auto pick a larger
    batch. For a card short of memory (set it with memory_budget_gib). With effective_batch, the plan's."""
    answer_only_logits: Literal["auto", True, False] = "auto"
    """Compute the vocabulary logits only where the loss needs them (the answer tokens) instead of at every
    position: the same loss, without a (batch x length x 151,936) fp32 tensor. false: the model's own loss.
    auto/true for this and the four speed patches below: auto steps aside, with a log line naming the versions
    and the cost, when the installed libraries are not the ones it was written for; true makes that an error."""
    liger_kernels: Literal["auto", True, False] = "auto"
    """Liger's fused RoPE, RMSNorm and SwiGLU kernels (Triton) in place of Qwen3-VL's (SwiGLU around the 4-bit MLP
    projections, which stay as they are): on an H100, +20% samples/s at 448x448 images and +43% at 896x896 from
    RoPE and RMSNorm, the same loss to bf16 rounding (bench/results). auto: on when there is a GPU and a
    liger-kernel that supports the installed transformers (requirements.txt); true: required; false: never."""
    fused_lora_forward: Literal["auto", True, False] = "auto"
    """LoRA layers on the 4-bit base add their update inside the B matmul (one GEMM, the scaling folded into B)
    and skip peft's defensive copy of the base layer's output; the same result to rounding (tests). false:
    peft's own forward."""
    positions_in_dataloader: Literal["auto", True, False] = "auto"
    """Qwen3-VL's M-RoPE position ids are computed in the dataloader workers, by transformers' own function on the
    CPU, and passed to the forward, which otherwise computes them sample by sample on the GPU with about 9 host
    synchronisations a sample. The same positions (tests). false: the forward's own."""
    batched_vision_attention: Literal["auto", True, False] = "auto"
    """The vision tower attends all images of one size in one attention call, instead of transformers' one call per
    image (its path without FlashAttention), which leaves the GPU waiting on the CPU at small images and large
    batches. The same result to rounding (tests). false: transformers' own."""
    fp32_upcast: bool = False
    """Cast the base's non-quantized weights (norms, embeddings, lm_head) to fp32, as peft's
    prepare_model_for_kbit_training does. Not needed with bf16 compute, and about 40% slower; for float16."""
    optimizer_state: Literal["fresh", "resume"] = "fresh"
    """`resume` carries the previous stage's AdamW moments over; steps, schedule and data order start anew."""
    eval_questions: int = -1
    """Dev questions answered by generation at the end of the stage (accuracy, P/R/F1): -1 all, 0 off, N the first N."""
    max_new_tokens: int = 16
    """Longest generated answer, in tokens."""
    numeric_tolerance: float = 1.0
    """A numeric answer within this absolute distance of the gold one counts for `accuracy_within_tolerance`."""
    watch_earlier_stages: bool = True
    """Stage >= 2: evaluate the dev split of every earlier stage of the lineage too (each one's final_eval_file, found
    through prev_checkpoint's stage_metrics.json): the loss before the first step, at every eval_steps evaluation
    and at the end, and answers by generation at the end (as eval_questions). Logged, in TensorBoard
    (eval/stage<N>_loss) and in stage_metrics.json (`earlier_stages`)."""
    forgetting_tolerance: float | None = None
    """Off (null) by default. The largest relative rise of an earlier stage's dev loss allowed during this stage:
    (loss - loss before this stage's first step) / loss before the first step, checked at every evaluation
    (eval_steps) and at the last step; 0.1 allows 10%. Over it, forgetting_action happens."""
    forgetting_action: Literal["warn", "stop"] = "warn"
    """When forgetting_tolerance is exceeded: `warn` logs it and records it in stage_metrics.json (`forgetting`);
    `stop` saves a checkpoint in <output_dir>.partial, does not save the stage, and exits 5 (the message says how
    to resume or retrain)."""
    replay: ReplaySettings = field(default_factory=ReplaySettings)
    """Replay of earlier stages' training records: `replay: {fraction: 0.2, stages: all}`."""
    tensorboard: bool = True
    """Write TensorBoard logs to <output_dir's parent>/tensorboard/<stage dir name>."""
    dataloader_num_workers: int = 2
    """Processes that decode and tokenise samples while the model trains."""
    cache_image_checks: bool = True
    """Every image is decoded once before training, to find broken ones. Remember those that decoded cleanly (by
    path, size and modification time) in <output_dir>/../.cache/image_checks.json, so later stages and reruns
    over the same images skip it. false: decode every image every time."""
    overwrite: bool = False
    """Allow replacing an output_dir that already holds a finished stage."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model checkpoint. Qwen3-VL needs none; turn on only for a checkpoint
    you trust."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapter shape; identical across the stages of a curriculum."""
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)
    """4-bit quantization of the frozen base."""


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
    """Read a stage YAML (safely: no object construction), apply overrides, type-check every key
    (curriculum/typed_yaml.py): one error listing every unknown key, with the closest valid one, and wrong type."""
    return read_yaml_dataclass(StageConfig, path, overrides)


def keys_set(cfg: StageConfig) -> dict:
    """The keys whose values differ from the defaults (the required ones always), nested as in the YAML: what the
    start of a stage's log shows, short enough that what follows is not buried under 80 lines of defaults."""
    defaults = dataclasses.asdict(StageConfig(output_dir=cfg.output_dir, train_file=cfg.train_file))

    def differing(values: dict, default: dict) -> dict:
        out = {}
        for key, value in values.items():
            if isinstance(value, dict):
                value = differing(value, default[key])
            if value != default[key] and value != {} or key in ("output_dir", "train_file"):
                out[key] = value
        return out

    return differing(dataclasses.asdict(cfg), defaults)


def validate_config(cfg: StageConfig, training: bool = True) -> None:
    """Every problem in one error, each line naming the key to change; runs before anything heavy loads.
    training=False (`--check`): what only training needs (a GPU for batch_size: auto) is a note, not a problem."""
    problems = []
    positive = {"lr": cfg.lr, "batch_size": 1 if cfg.batch_size == "auto" else cfg.batch_size,
                "eval_batch_size": cfg.eval_batch_size,
                "memory_budget_gib": 1 if cfg.memory_budget_gib == "auto" else cfg.memory_budget_gib,
                "effective_batch": 1 if cfg.effective_batch is None else cfg.effective_batch,
                "grad_accum": cfg.grad_accum, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
                "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "max_seq_len": cfg.max_seq_len,
                "logging_steps": cfg.logging_steps}
    problems += [f"{k} must be > 0, got {v}" for k, v in positive.items() if not v > 0]
    if cfg.stage < 1:
        problems.append(f"stage must be >= 1, got {cfg.stage}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"max_steps must be > 0, or -1 to run `epochs`; got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.epochs > 0:
        problems.append(f"epochs must be > 0 when max_steps is -1, got {cfg.epochs}")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    problems += effective_batch_problems(cfg, processes().num_processes)
    if cfg.batch_size == "auto" and cfg.effective_batch is None and not gpu_available():
        no_gpu = ("batch_size: auto measures GPU memory to choose the batch, and there is no GPU here; set "
                  "batch_size to a number")
        if training:
            problems.append(no_gpu)
        else:
            print_main(f"Note: {no_gpu} to train on this machine")
    if not 0 <= cfg.checkpointed_layers <= 1:
        problems.append(f"checkpointed_layers must be in [0, 1], got {cfg.checkpointed_layers}")
    if cfg.fp32_upcast is False and cfg.quantization.compute_dtype == "float16":
        problems.append("quantization.compute_dtype: float16 needs fp32_upcast: true (fp16 norms overflow); "
                        "or use bfloat16")
    problems += fsdp_config_problems(cfg)  # what FSDP cannot do, when launched with it
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        problems.append("lora.target_modules must name at least one module")
    if cfg.eval_questions < -1:
        problems.append(f"eval_questions must be -1 (all), 0 (off) or a count, got {cfg.eval_questions}")
    if cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be > 0, got {cfg.max_new_tokens}")
    if cfg.numeric_tolerance < 0:
        problems.append(f"numeric_tolerance must be >= 0, got {cfg.numeric_tolerance}")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("tensorboard: true, but the tensorboard package is not installed (pip install tensorboard, "
                        "or set tensorboard: false)")
    for key in ("eval_steps", "save_steps", "dataloader_num_workers"):
        if getattr(cfg, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(cfg, key)}")
    problems += speed.plan_speed_patches(cfg, fsdp_enabled())[1]  # a patch set to true that cannot apply here
    if cfg.min_pixels > cfg.max_pixels:
        problems.append(f"min_pixels ({cfg.min_pixels}) must not exceed max_pixels ({cfg.max_pixels})")
    problems += split_config_problems(cfg)  # the split files exist and are readable, no column named twice
    if cfg.stage >= 2 and not cfg.prev_checkpoint:
        problems.append(f"stage {cfg.stage} needs prev_checkpoint: the adapter of stage {cfg.stage - 1} to continue")
    if cfg.stage == 1 and cfg.prev_checkpoint and not cfg.continue_at_stage_1:
        problems.append("stage 1 makes a new adapter: remove prev_checkpoint, set stage: 2 to continue it, or set "
                        "continue_at_stage_1: true to continue it as stage 1")
    if cfg.prev_checkpoint:
        problems += adapter_files.prev_checkpoint_problems(Path(cfg.prev_checkpoint), cfg.lora, cfg.optimizer_state)
        if Path(cfg.prev_checkpoint).resolve() == Path(cfg.output_dir).resolve():
            problems.append("output_dir must differ from prev_checkpoint: a stage never overwrites the one it "
                            "continues")
    elif cfg.optimizer_state == "resume":
        problems.append("optimizer_state: resume needs a prev_checkpoint to take the moments from")
    # forgetting_tolerance, forgetting_action, replay (curriculum/forgetting.py): reads the lineage, hashes files
    problems += forgetting.config_problems(cfg, stage_folder.previous_stage_metrics, stage_folder.previous_stage_dir,
                                           split_sha256)
    out = Path(cfg.output_dir)
    if (out / STAGE_METRICS).is_file() and not cfg.overwrite:
        problems.append(f"output_dir: {out} already holds a finished stage; choose another or set overwrite: true")
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  - {p}" for p in problems))


def effective_batch_problems(cfg: StageConfig, num_processes: int) -> list[str]:
    """effective_batch plans batch_size, grad_accum, checkpointed_layers and offload_activations itself."""
    if cfg.effective_batch is None:
        return []
    set_by_hand = {key: getattr(cfg, key) for key, default in (("batch_size", "auto"), ("grad_accum", 1),
                                                               ("checkpointed_layers", 1.0),
                                                               ("offload_activations", False))
                   if getattr(cfg, key) != default}
    problems = [f"{key}: {str(value).lower() if isinstance(value, bool) else value} is chosen by the plan when "
                "effective_batch is set; remove it (or effective_batch)" for key, value in set_by_hand.items()]
    if cfg.effective_batch > 0 and cfg.effective_batch % num_processes:
        problems.append(f"effective_batch ({cfg.effective_batch}) must be a multiple of the {num_processes} processes "
                        "(each takes an equal share of a step)")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Data: a split's lines -> Records (curriculum/records.py: the question as chat messages, the answer as the reply
# text; curriculum/data_files.py: JSONL or a dataset, every image decoded once) -> token ids and labels
# ---------------------------------------------------------------------------------------------------------------------


def mask_prompt_tokens(input_ids: list[int], prompt_len: int) -> list[int]:
    """Labels: the prompt (system, user turn, image tokens, `<|im_start|>assistant\\n`) masked to -100.

    The boundary is the prompt's length in tokens, measured on the rendered template itself; searching
    for the "assistant" token instead leaks prompt text whenever a question contains that word.
    """
    if not 0 < prompt_len < len(input_ids):
        raise ValueError(f"prompt of {prompt_len} tokens leaves no answer in a sample of {len(input_ids)}")
    return [IGNORE_INDEX] * prompt_len + list(input_ids[prompt_len:])


def encode_example(processor, rec: Record, min_pixels: int, max_pixels: int) -> dict:
    """One record -> model inputs: ids, labels (answer only), attention mask, mm_token_type_ids, pixels."""
    import torch

    prompt_text, images = prompt_and_images(processor, rec, min_pixels, max_pixels)
    enc = processor(text=[prompt_text], images=images or None, return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    input_ids = prompt_ids + answer_token_ids(processor.tokenizer, rec.answer)
    example = {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(mask_prompt_tokens(input_ids, len(prompt_ids))),
        # 1 at image-token positions: Qwen3-VL's forward needs it whenever pixel values are passed.
        "mm_token_type_ids": torch.tensor([int(t == processor.image_token_id) for t in input_ids]),
    }
    if images:
        example["pixel_values"] = enc["pixel_values"]
        example["image_grid_thw"] = enc["image_grid_thw"]
    return example


class VQADataset:
    """Records encoded on demand (in the dataloader's workers), so images are decoded in parallel with training."""

    def __init__(self, records: list[Record], processor, cfg: StageConfig):
        faults.end_dataloader_workers_at_exit()
        self.records, self.processor = records, processor
        self.bad_records: list[str] = []  # `file:line: problem` of the records skipped (on_bad_record: skip)
        self.lengths: list[int] | None = None  # tokens per record, when load_split measured them
        self.min_pixels, self.max_pixels = cfg.min_pixels, cfg.max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        faults.leave_stop_signals_to_the_trainer()
        return encode_example(self.processor, self.records[i], self.min_pixels, self.max_pixels)


def collate_batch(examples: list[dict], pad_token_id: int, positions=None) -> dict:
    """Right-pad to the longest sample: ids with pad, labels with -100, masks with 0; concatenate image patches.
    `positions` (speed.MRopePositions, with positions_in_dataloader): the batch's M-RoPE position ids too."""
    import torch

    longest = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(e[key], (0, longest - len(e[key])), value=value)
                            for e in examples])

    batch = {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", IGNORE_INDEX),
             "mm_token_type_ids": pad("mm_token_type_ids", 0),
             "attention_mask": torch.stack([torch.nn.functional.pad(torch.ones(len(e["input_ids"]), dtype=torch.long),
                                                                    (0, longest - len(e["input_ids"])))
                                            for e in examples])}
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    position_ids = positions(batch) if positions is not None else None
    if position_ids is not None:
        batch["position_ids"] = position_ids
    return batch


def load_split(path: str, processor, cfg: StageConfig, split: str) -> VQADataset:
    """A split's records, each checked before training (curriculum/data_files.py: records parsed, every image decoded
    once, lengths measured; bad or over-long records an error or skipped as configured), encoded on demand."""
    records, lengths, skipped = check_split(path, processor, cfg, split)
    dataset = VQADataset(records, processor, cfg)
    dataset.bad_records, dataset.lengths = skipped, lengths
    return dataset


def as_read_by(cfg: StageConfig, stage_dir: str | os.PathLike) -> StageConfig:
    """cfg, reading splits as the stage in `stage_dir` read them: its `columns` and `question_type` (from its
    resolved_config.yaml), since an earlier stage's split has its own layout (stage 1 on VQAv2, stage 2 on DocVQA);
    the prompt, the pixels and the checks stay this stage's. cfg as it is where that config does not read."""
    try:
        earlier = load_config(Path(stage_dir) / RESOLVED_CONFIG)
    except ConfigError as err:
        print_main(f"WARNING: {stage_dir}'s config does not read ({str(err).splitlines()[0]}); its splits are read "
                   "with this stage's columns and question_type")
        return cfg
    return dataclasses.replace(cfg, columns=earlier.columns, question_type=earlier.question_type)


# ---------------------------------------------------------------------------------------------------------------------
# Model: 4-bit base once, k-bit preparation once, then a new adapter (stage 1) or the previous one, trainable; proved
# ---------------------------------------------------------------------------------------------------------------------


def load_quantized_base(model_path: str, cfg: StageConfig):
    """The frozen base in 4 bit, prepared for k-bit training exactly once (this is the only place that does it)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    t0 = time.time()
    model = from_pretrained_checked(
        AutoModelForImageTextToText, model_path, cfg, quantization_config=bnb_config(cfg.quantization),
        dtype=getattr(torch, cfg.quantization.compute_dtype), device_map={"": training_device()})
    speed.keep_4bit_layers_differentiable(model)
    if cfg.fp32_upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        # What prepare_model_for_kbit_training does, minus the fp32 copy of every non-quantized weight: with bf16
        # compute the norms already compute in fp32 inside, and the up-cast costs ~40% of the speed.
        for param in model.parameters():
            param.requires_grad_(False)
    checkpointed = speed.apply_gradient_checkpointing(model, cfg)  # here, once; the Trainer is not asked to
    print_main(f"Loaded 4-bit {cfg.quantization.quant_type} base {model_path} in {time.time() - t0:.1f}s "
               f"(double quant {cfg.quantization.double_quant}, compute {cfg.quantization.compute_dtype}, storage "
               f"{quant_storage_dtype(cfg.quantization)}, fp32 up-cast {cfg.fp32_upcast}, gradient checkpointing on "
               f"{checkpointed} decoder layers)")
    return model


def new_adapter(model, lora: LoraSettings, seed: int):
    """Stage 1: a fresh LoRA adapter (B = 0, so the model starts exactly as the base). A is drawn from the random
    generator seeded right here: every process must start from the same adapter, whatever drew random numbers
    before (on a fresh machine the main process alone builds the tiny model first)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    print_main("Creating a new LoRA adapter (stage 1)")
    set_seed(seed)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    return adapter_files.save_lora_only(model)


def continue_adapter(model, prev_checkpoint: str):
    """Stage >= 2: reopen the previous stage's adapter *for training*. No merge, no second k-bit preparation,
    no second adapter: the weights that train now are the very ones the previous stage saved."""
    from peft import PeftModel

    print_main("*** CURRICULUM LEARNING MODE ***")
    print_main(f"Continuing training from previous checkpoint: {prev_checkpoint}")
    print_main("Loading existing LoRA adapter (will continue training the same adapter)...")
    model = PeftModel.from_pretrained(model, prev_checkpoint, is_trainable=True)
    print_main("✓ Loaded previous adapter - continuing training on the same adapter")
    return adapter_files.save_lora_only(model)


def check_adapter_trainable(model, lora: LoraSettings) -> int:
    """Prove before the first step that exactly one adapter trains: only LoRA weights require grad, and
    their count is the one the module shapes and LoRA config imply (0 means a frozen reload, 2x a second
    adapter). Raises on any mismatch; returns the trainable count."""
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    not_lora = [n for n in trainable if "lora_" not in n]
    if not_lora:
        raise CurriculumError(f"{len(not_lora)} non-LoRA parameters require grad, e.g. {not_lora[:3]}")
    adapters = list(getattr(model, "peft_config", {}))
    if adapters != ["default"]:
        raise CurriculumError(f"expected exactly one adapter named 'default', found {adapters}")
    count, expected = sum(trainable.values()), adapter_files.expected_lora_param_count(model, lora)
    if count != expected:
        raise CurriculumError(f"{count:,} trainable parameters, but the LoRA config on this model's shapes "
                              f"implies {expected:,}: the adapter is frozen or duplicated")
    return count


def check_loaded_adapter_matches(model, prev_checkpoint: str) -> str:
    """The LoRA weights now in the model are exactly those the previous stage saved; returns their hash."""
    loaded = adapter_files.loaded_adapter_sha256(model)
    if loaded != adapter_files.file_adapter_sha256(prev_checkpoint):
        raise CurriculumError(f"the adapter weights in memory differ from {prev_checkpoint}/{ADAPTER_WEIGHTS}: "
                              "this is not the adapter the previous stage saved")
    return loaded


def prove_adapter(model, cfg: StageConfig) -> list[dict]:
    """Before the first step, every process proves that it holds the adapter to train (only LoRA trains, in the
    expected count; at stage >= 2 the weights are the previous stage's), then all compare what they hold: one
    stale copy of prev_checkpoint on one machine stops the run on every process, not just on that one. Returns
    one view per process: {process, trainable_params, start_tensors_sha256}."""
    view = {"process": processes().process_index, "error": None}
    try:
        view["trainable_params"] = check_adapter_trainable(model, cfg.lora)
        view["start_tensors_sha256"] = (check_loaded_adapter_matches(model, cfg.prev_checkpoint)
                                        if cfg.prev_checkpoint else adapter_files.loaded_adapter_sha256(model))
    except CurriculumError as err:
        view["error"] = str(err)
    views = gather_from_processes(view)
    failed = [v for v in views if v["error"]]
    if failed:  # one process: its message as it is; several: each failing process named
        raise CurriculumError(failed[0]["error"] if len(views) == 1
                              else "\n".join(f"process {v['process']}: {v['error']}" for v in failed))
    hint = ("Every process must read the same prev_checkpoint; on several machines, put it on a shared disk"
            if cfg.prev_checkpoint else "A new adapter is drawn from `seed` on every process; they must all use one")
    check_processes_agree(views, "start_tensors_sha256", "weights before the first step", hint)
    check_processes_agree(views, "trainable_params", "trainable parameters", hint)
    trainable = views[0]["trainable_params"]
    if cfg.prev_checkpoint:
        print_main("✓ Adapter is trainable and ready for continued training")
    if is_main_process():
        model.print_trainable_parameters()
    print_main(f"Trainable parameters: {trainable:,} (LoRA only; equals r x (in + out) over the targeted modules)")
    if len(views) > 1:
        print_main(f"✓ All {len(views)} processes hold the same adapter (tensors sha256 "
                   f"{views[0]['start_tensors_sha256'][:16]}...), trainable, {trainable:,} parameters each")
    return [{k: v for k, v in view.items() if k != "error"} for view in views]


# ---------------------------------------------------------------------------------------------------------------------
# Train: the Trainer with the answer-only loss; fit, with its faults handled; measure; save
# ---------------------------------------------------------------------------------------------------------------------


def planned_steps(n_train: int, cfg: StageConfig, num_processes: int) -> int:
    """Optimizer steps of the stage. An epoch is ceil(n / (batch_size x processes)) batches on each process (the
    last one filled up from the start), and a last, shorter accumulation still makes a step, as in the Trainer."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.batch_size * num_processes)) / cfg.grad_accum)
    return math.ceil(per_epoch * cfg.epochs)


def auto_batch_size(model, dataset, processor, cfg: StageConfig) -> int:
    """batch_size: auto (curriculum/batch_size.py), measured on the batches and the loss the Trainer trains with
    (build_trainer)."""
    return choose_batch_size(model, dataset, cfg, trainer_collate(model, processor, cfg), trainer_step_loss(cfg))


def plan_effective_batch(model, dataset, processor, cfg: StageConfig, measured: dict | None = None):
    """effective_batch (curriculum/plan.py), measured on the batches and the loss the Trainer trains with
    (build_trainer). Returns the plan, the model set to it, and the record of what was measured."""
    return plan_step(model, dataset, cfg, trainer_collate(model, processor, cfg), trainer_step_loss(cfg), measured)


def with_plan(cfg: StageConfig, plan: Plan) -> StageConfig:
    """The config the stage trains with under a plan: its micro-batch, accumulation and memory settings."""
    return dataclasses.replace(cfg, batch_size=plan.micro_batch, grad_accum=plan.grad_accum,
                               gradient_checkpointing=plan.checkpointed > 0,
                               checkpointed_layers=plan.checkpointed_fraction if plan.checkpointed else 1.0,
                               offload_activations=plan.offload)


def trainer_collate(model, processor, cfg: StageConfig):
    """The Trainer's data_collator: collate_batch, with the M-RoPE positions where positions_in_dataloader is on."""
    pad_id = processor.tokenizer.pad_token_id
    positions = speed.MRopePositions(model.config) if cfg.positions_in_dataloader else None
    return functools.partial(collate_batch, pad_token_id=pad_id, positions=positions)


def trainer_step_loss(cfg: StageConfig):
    """The training loss of one batch as the Trainer computes it (without the accumulation's token count)."""

    def step_loss(model, batch: dict):
        return answer_only_loss(model, batch)[0] if cfg.answer_only_logits else model(**batch).loss

    return step_loss


def build_trainer(model, processor, train_ds, eval_ds, cfg: StageConfig, work_dir: Path):
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    world = processes().num_processes
    total = planned_steps(len(train_ds), cfg, world)
    print_main(f"Effective batch size {cfg.batch_size * world * cfg.grad_accum} = {cfg.batch_size} per process x "
               f"{world} process(es) x {cfg.grad_accum} accumulation step(s); {total} optimizer steps planned")
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=total, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=math.ceil(cfg.warmup_ratio * total),
        max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps, seed=cfg.seed, data_seed=cfg.seed,
        eval_strategy="steps" if cfg.eval_steps and eval_ds is not None else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        bf16=on_gpu and cfg.quantization.compute_dtype == "bfloat16",
        fp16=on_gpu and cfg.quantization.compute_dtype == "float16",
        use_cpu=not on_gpu, remove_unused_columns=False, label_names=["labels"], report_to="none",
        # not dataloader_persistent_workers: with it the Trainer keeps the first evaluation's dataloader and
        # evaluates every later eval_dataset with it, so continuity would be measured on the wrong split
        dataloader_num_workers=cfg.dataloader_num_workers, dataloader_pin_memory=on_gpu,
        ddp_find_unused_parameters=False, disable_tqdm=False, save_total_limit=2,
        prediction_loss_only=True,  # evaluation needs the loss only; never gather every batch's logits
    )
    one_gpu_per_process(args, world)
    align_special_tokens(model, processor.tokenizer)  # what the Trainer would do, without its warning
    trainer_class = answer_only_loss_trainer(Trainer) if cfg.answer_only_logits else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=trainer_collate(model, processor, cfg), processing_class=processor)
    trainer.remove_callback(ProgressCallback)
    for callback in make_log_callbacks():
        trainer.add_callback(callback)
    if cfg.tensorboard and is_main_process():  # written by one process
        trainer.add_callback(tensorboard_callback(cfg.output_dir))
    return trainer


def eval_loss(trainer, dataset, prefix: str) -> float | None:
    if dataset is None:
        return None
    return trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)[f"{prefix}_loss"]


@dataclass
class StageData:
    """What a stage trains and measures on: every split parsed and checked before the model loads."""
    train: VQADataset
    eval: VQADataset | None
    continuity: VQADataset | None  # first_eval_loss's split: the dev split the previous stage ended on, else eval
    continuity_file: str | None
    prev_metrics: dict  # the previous stage's stage_metrics.json ({} without one)
    data_files: dict | None  # {train_file: {path, sha256}, ...}: what the stage saw, by content (main process only)
    replay: dict | None  # earlier stages' training records mixed into train: which, how many, their files' SHA-256
    earlier_splits: dict  # {"stage1": dev split, ...}: every earlier stage's dev split, watched during the stage


def load_stage_data(cfg: StageConfig, processor) -> StageData:
    """Setup data: every split of the stage loaded and checked, and the split the previous stage ended on."""
    train_ds = load_split(cfg.train_file, processor, cfg, "train")
    eval_ds = load_split(cfg.eval_file, processor, cfg, "eval") if cfg.eval_file else None
    prev_metrics = stage_folder.previous_stage_metrics(cfg.prev_checkpoint) or {}
    hashes = split_hashes(cfg) if is_main_process() else None  # one process hashes them
    # Earlier stages (curriculum/forgetting.py): their training records replayed, their dev splits watched
    earlier = forgetting.lineage(cfg.prev_checkpoint, stage_folder.previous_stage_metrics,
                                 stage_folder.previous_stage_dir)
    # each earlier stage's split read with that stage's columns and question_type
    def load_earlier(path: str, name: str, stage: forgetting.EarlierStage) -> VQADataset:
        return load_split(path, processor, as_read_by(cfg, stage.dir), name)

    replay = forgetting.mix_replay(train_ds, cfg, earlier, load_earlier, split_sha256)
    earlier_splits = forgetting.earlier_dev_splits(earlier, load_earlier) if cfg.watch_earlier_stages else {}
    # first_eval_loss is measured on the split the previous stage ended on, so the two numbers compare.
    prev_eval_file = prev_metrics.get("final_eval_file")
    if cfg.prev_checkpoint and prev_eval_file and Path(prev_eval_file).exists():  # a file, or a dataset folder
        continuity = (load_split(prev_eval_file, processor, as_read_by(cfg, cfg.prev_checkpoint),
                                 "previous stage's eval"), prev_eval_file)
    else:
        continuity = eval_ds, cfg.eval_file
        if cfg.prev_checkpoint:
            print_main(f"WARNING: {cfg.prev_checkpoint} records no eval split; first_eval_loss uses this stage's own")
    return StageData(train_ds, eval_ds, *continuity, prev_metrics, hashes, replay, earlier_splits)


@dataclass
class Fit:
    """What training gave: the Trainer (its state and log history), its result, and what was measured around it."""
    trainer: Any
    result: Any  # the Trainer's TrainOutput
    batch_size: int
    grad_accum: int
    plan: dict | None  # effective_batch: the plan chosen (or kept by a resumed run) and what it measured
    patches: dict  # the speed patches' decisions, with the plan's offload
    first_eval_loss: float | None
    first_eval_loss_own_split: float | None
    train_seconds: float
    resumed_at: int  # the step an interrupted run resumed from; 0 from the start
    watch: Any  # forgetting.EarlierStagesWatch: the earlier stages' dev losses during the stage


def fit(model, processor, data: StageData, cfg: StageConfig, patches: dict, work_dir: Path,
        resume_from: str | None) -> Fit:
    """Choose the batch (or keep a resumed run's), build the Trainer, carry the previous stage's optimizer moments
    over if asked, measure the losses before the first step, train. A diverged loss, a stop signal or a full disk
    ends the stage here, saying what to do."""
    # what the interrupted run measured before its first step and the batch it chose, kept for the resumed run
    resumed = json.loads((work_dir / STAGE_START).read_text()) if resume_from else None
    # cfg itself stays as written (resume compares it); run_cfg holds what auto resolved to
    run_cfg = dataclasses.replace(cfg, answer_only_logits=patches["answer_only_logits"].on,
                                  positions_in_dataloader=patches["positions_in_dataloader"].on)
    batch_size, plan = cfg.batch_size, None
    if cfg.effective_batch and resumed:  # a resumed run keeps the plan it was started with
        plan = {"chosen": resumed["plan"]["chosen"], "kept_from_the_interrupted_run": True}
        kept = Plan(**plan["chosen"])
        speed.set_checkpointed_layers(model, kept.checkpointed, kept.offload)
        print_main(f"Plan: {kept.describe()} (the interrupted run's)")
    elif cfg.effective_batch:
        plan = plan_effective_batch(model, data.train, processor, run_cfg)[1]
    if plan:
        run_cfg = with_plan(run_cfg, Plan(**plan["chosen"]))
        batch_size = run_cfg.batch_size
        where = "pinned CPU memory" if gpu_available() else "a copy (a CPU run: nothing to save)"
        patches = patches | {"offload_activations": speed.PatchDecision(
            run_cfg.offload_activations, f"on, by the plan ({plan['chosen']['checkpointed']} checkpointed decoder "
            f"layers keep their inputs in {where})" if run_cfg.offload_activations else "off, by the plan")}
    elif batch_size == "auto" and resumed:  # a resumed run keeps the batch it was started with
        batch_size = resumed["batch_size_chosen"]
    elif batch_size == "auto":
        batch_size = auto_batch_size(model, data.train, processor, run_cfg)
    run_cfg = dataclasses.replace(run_cfg, batch_size=batch_size)

    trainer = build_trainer(model, processor, data.train, data.eval, run_cfg, work_dir)
    guard = faults.StageGuard(model)
    trainer.add_callback(guard.callback())
    watch = forgetting.EarlierStagesWatch(
        data.earlier_splits, cfg, work_dir, resumed=bool(resume_from),
        evaluate=lambda datasets, prefix: trainer.evaluate(eval_dataset=datasets, metric_key_prefix=prefix))
    if data.earlier_splits:
        trainer.add_callback(watch.callback())
    if cfg.optimizer_state == "resume" and not resume_from:  # a resumed run restores its own optimizer
        trainer.create_optimizer()
        moments = Path(cfg.prev_checkpoint) / OPTIMIZER_MOMENTS
        n = adapter_files.load_optimizer_moments(model, trainer.optimizer, moments)
        print_main(f"Resumed AdamW moments for {n} LoRA tensors from {cfg.prev_checkpoint} (schedule starts anew)")

    start = {"t0": time.time(), "batch_size_chosen": batch_size, "plan": plan}

    def measure_start() -> None:
        """The losses before the first step (continuity with the previous stage), saved for a resumed run."""
        start["first_eval_loss"] = eval_loss(trainer, data.continuity, "first_eval")
        start["first_eval_loss_own_split"] = (eval_loss(trainer, data.eval, "first_own_eval")
                                              if data.continuity is not data.eval else start["first_eval_loss"])
        print_main(f"first_eval_loss {start['first_eval_loss']} (before the first step; previous stage ended at "
                   f"{data.prev_metrics.get('final_eval_loss')})")
        if cfg.prev_checkpoint:
            print_main(f"Stage {cfg.stage}: starting from the adapter saved by stage "
                       f"{data.prev_metrics.get('stage', '?')}")
        if trainer.is_world_process_zero():
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / STAGE_START).write_text(json.dumps({"config": dataclasses.asdict(cfg), **start}))
        start["t0"] = time.time()  # train_seconds counts training only

    if resumed:
        start = resumed | {"t0": time.time()}
        print_main(f"Resuming stage {cfg.stage} from {resume_from}: the step, optimizer, scheduler, RNG and data order "
                   "are restored")
    else:
        trainer.add_callback(before_first_step(measure_start))
    resumed_at = int(Path(resume_from).name.rsplit("-", 1)[1]) if resume_from else 0  # checkpoint-<step>
    with faults.disk_full_stops_the_stage(f"a checkpoint in {work_dir}", work_dir, work_dir, cfg):
        result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - start["t0"]
    guard.raise_if_stopped(trainer, work_dir, cfg.lr)
    watch.end(trainer.state, work_dir)  # the earlier stages' losses at the end; raises if forgetting stopped the stage
    return Fit(trainer, result, batch_size, run_cfg.grad_accum, plan, patches, start["first_eval_loss"],
               start["first_eval_loss_own_split"], train_seconds, resumed_at, watch)


def check_saved_adapter(saved_tensors: dict, trainable: int, staging: Path) -> None:
    """The file written holds exactly the LoRA parameters that trained: an empty or partial adapter (what the
    Trainer writes under FSDP through peft's filter) never passes for a stage."""
    saved = sum(t.numel() for t in saved_tensors.values())
    if saved != trainable:
        raise CurriculumError(f"the adapter written to {staging} holds {saved:,} LoRA parameters, but {trainable:,} "
                              "were trained; nothing was saved as the stage")


def save_stage(trainer, model, processor, cfg: StageConfig, metrics: dict, predictions: list | None,
               staging: Path) -> Path:
    """Write the stage atomically: adapter (safetensors only), processor, resolved config, metrics, predictions,
    plots and optimizer moments go to `<output_dir>.saving`, which is renamed into place only when complete."""
    out = Path(cfg.output_dir)
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed: start it clean
    # The base as the user named it (a hub id, or a path as given), not where this machine found it (peft writes
    # that: the tiny model's absolute path), so that a moved stage folder still names its base.
    model.peft_config["default"].base_model_name_or_path = cfg.model_name_or_path
    if fsdp_enabled():
        adapter_files.save_adapter_under_fsdp(trainer, model, processor, staging)
    else:
        trainer.save_model(str(staging))  # adapter_config.json + adapter_model.safetensors + processor files
    if not trainer.is_world_process_zero():
        return out
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml says it all
    saved_tensors = adapter_files.read_adapter_file(staging)  # read once: counted here, hashed below
    check_saved_adapter(saved_tensors, metrics["trainable_params"], staging)
    if fsdp_enabled():  # sharded moments are not per-parameter tensors; validate_config refuses resume under FSDP
        print_main("Optimizer moments are not saved under FSDP (a later stage uses optimizer_state: fresh)")
    else:
        adapter_files.save_optimizer_moments(model, trainer.optimizer, staging / OPTIMIZER_MOMENTS)
    metrics["saved_adapter_file_sha256"] = sha256_file(staging / ADAPTER_WEIGHTS)
    metrics["saved_adapter_tensors_sha256"] = adapter_files.adapter_tensors_sha256(saved_tensors)
    if adapter_files.processes_ended_apart_from(metrics["processes"], metrics["saved_adapter_tensors_sha256"]):
        raise CurriculumError(f"the adapter written to {staging} differs from the one the processes trained")
    (staging / RESOLVED_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    (staging / STAGE_METRICS).write_text(json.dumps(metrics, indent=2))
    accuracy = metrics_table(metrics["dev_metrics"]) if metrics.get("dev_metrics") else None
    card = stage_folder.model_card(cfg, metrics, accuracy)
    (staging / "README.md").write_text(card)  # not peft's empty template
    if predictions is not None:
        write_predictions(predictions, staging / "predictions_dev.jsonl")
    for plot in write_stage_plots(staging):
        print_main(f"Plot: {out / plot.name}")
    stage_folder.move_into_place(staging, out)  # an old stage there (overwrite: true) is kept until the new one is in
    return out


def train_stage(cfg: StageConfig) -> dict:
    """One stage: setup data -> setup model -> prove -> fit -> measure -> save. Returns its stage_metrics."""
    from transformers import set_seed

    set_seed(cfg.seed)
    model_path = resolve_model_path(cfg.model_name_or_path)
    processor = load_processor(model_path, cfg)
    data = load_stage_data(cfg, processor)
    work_dir = Path(f"{cfg.output_dir}.partial")  # intermediate checkpoints; removed once the stage is saved
    with processes().main_process_first():  # the main process tidies work_dir; the others then read the same
        # before the long model load: a mismatch is reported at once
        resume_from = faults.interrupted_run(work_dir, dataclasses.asdict(cfg))

    # The curriculum: stage 1 wraps the base in a new adapter; a later stage reopens the previous stage's adapter
    # for training. Either way, proved before the first step to be the one adapter that trains.
    model = load_quantized_base(model_path, cfg)
    if cfg.prev_checkpoint:
        model = continue_adapter(model, cfg.prev_checkpoint)
    else:
        model = new_adapter(model, cfg.lora, cfg.seed)
    patches = speed.apply_speed_patches(model, cfg, speed.plan_speed_patches(cfg, fsdp_enabled())[0], print_main)
    process_views = prove_adapter(model, cfg)

    fitted = fit(model, processor, data, cfg, patches, work_dir, resume_from)
    final_eval = eval_loss(fitted.trainer, data.eval, "final_eval")
    print_main(f"final_eval_loss {final_eval}")
    process_views = adapter_files.check_trained_adapter_on_every_process(model, process_views)
    dev_metrics, predictions = evaluate_dev_split(model, processor, data.eval, cfg, len(process_views))
    if data.earlier_splits and cfg.eval_questions and not fsdp_enabled():  # the earlier stages' dev splits, answered
        fitted.watch.answer(lambda records: evaluate_records(model, processor, records, cfg)[0], cfg.eval_questions)
    metrics = stage_folder.stage_metrics(cfg, data, fitted, process_views, fitted.patches, final_eval, dev_metrics)

    staging = Path(f"{cfg.output_dir}.saving")
    with faults.disk_full_stops_the_stage(f"the stage to {staging}", staging, work_dir, cfg):
        out = save_stage(fitted.trainer, model, processor, cfg, metrics, predictions, staging)
    if fitted.trainer.is_world_process_zero():
        shutil.rmtree(work_dir, ignore_errors=True)
        print_main(f"Saved stage {cfg.stage} to {out} (adapter sha256 {metrics['saved_adapter_file_sha256'][:16]}...)")
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def check_data(cfg: StageConfig) -> None:
    """`--check`: validate config and every split (records, images, lengths) without loading the model."""
    processor = load_processor(resolve_model_path(cfg.model_name_or_path), cfg)
    for split, path in (("train", cfg.train_file), ("eval", cfg.eval_file)):
        if path:
            load_split(path, processor, cfg, split)
    print_main("Check passed: config and data are valid (no model loaded, nothing trained)")


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides, check = parse_args(sys.argv[1:] if argv is None else argv, __doc__)
        cfg = load_config(config_path, overrides)
        validate_config(cfg, training=not check)
        print_main(f"Config {config_path} (the keys set; every key, defaults included, is saved with the stage as "
                   f"{RESOLVED_CONFIG}):\n" + yaml.safe_dump(keys_set(cfg), sort_keys=False, width=1000).rstrip())
        print_main(runtime())
        if check:
            check_data(cfg)
        else:
            train_stage(cfg)
    # These reach every process alike (the checks compare across processes), so the main process says them once.
    except (ConfigError, CurriculumError, DiskFull) as err:  # exit 2, 1 and 4 (curriculum/errors.py)
        print_main(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except StageStopped as stop:
        print_main(f"Stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            where = f"process {runtime().rank}: " if runtime().world_size > 1 else ""  # one GPU can run out alone
            print(out_of_memory_message(err, where), file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
