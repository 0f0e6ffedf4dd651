"""The stage config: the YAML's keys as typed dataclasses (a docstring under each field: docs/config.md is generated
from them), the names other tools give some keys, and each group of keys' own checks.

Every helper in curriculum/ that reads the config names these types; the recipe (train_qlora_qwen3vl.py) reads a
YAML with `load_config` and runs every check in one pass, its `validate_config`, which adds the checks that read files,
the GPU or the installed libraries. The YAML keys and `--set` names are these fields' names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from curriculum.processes import gpu_available, print_main
from curriculum.typed_yaml import read_yaml_dataclass

# ---------------------------------------------------------------------------------------------------------------------
# The keys
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

    def problems(self) -> list[str]:
        """lora.dropout and lora.target_modules (lora.r and lora.alpha are among size_problems' counts)."""
        problems = []
        if not 0 <= self.dropout < 1:
            problems.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            problems.append("lora.target_modules must name at least one module")
        return problems


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

    def problems(self, fp32_upcast: bool) -> list[str]:
        """The compute dtype against the up-cast (`fp32_upcast`, the stage's key); quant_storage under FSDP is
        fsdp_problems'."""
        if fp32_upcast is False and self.compute_dtype == "float16":
            return ["quantization.compute_dtype: float16 needs fp32_upcast: true (fp16 norms overflow); or use "
                    "bfloat16"]
        return []


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

    @property
    def on(self) -> bool:
        """Replay asked for (a valid fraction: ReplaySettings.problems)."""
        return 0 < self.fraction < 1

    def problems(self) -> list[str]:
        """The fraction and the list as written; whether the stages and their files are there is the lineage's
        (forgetting.replay_source_problems)."""
        problems = []
        if not 0 <= self.fraction < 1:
            problems.append(f"replay.fraction must be in [0, 1) (the share of replayed records in the mixed training "
                            f"set; 0 is off), got {self.fraction}")
        if isinstance(self.stages, list) and not self.stages:
            problems.append("replay.stages must name at least one stage, or be all")
        return problems


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

    def problems(self) -> list[str]:
        """A column named for two fields. (answer and references may share one: a list there is the references, a
        text the answer.)"""
        named = {k: c for k, c in vars(self).items() if k != "references" or c != self.answer}
        return [f"columns: '{column}' is named for {', '.join(k for k, c in named.items() if c == column)}; each "
                "field has a column of its own" for column in sorted({c for c in named.values()
                                                                       if list(named.values()).count(c) > 1})]


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
    over all answer tokens of a step. Leave those four keys at their defaults (streamed_layers: 0 or auto). null:
    batch_size x grad_accum x processes."""
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
    streamed_layers: float | Literal["auto"] = 0.0
    """The fraction of the language model's decoder layers, the first ones, that keep what autograd saves in
    pinned CPU memory between the forward and the backward (copied out on a side stream, and back one layer ahead
    of the backward), instead of recomputing it (checkpointed_layers then applies to the other layers) or keeping
    it on the GPU. It trades recomputation for PCIe traffic, about 110 KB a token a layer on the 8B shape: on an
    H200 (about 58 GB/s each way) a third of the layers streamed was 1.5-8% slower than recomputing them, for about
    0.6 GiB less, so it pays only on a much faster host link. Checked on the GPU before the first step against
    keeping the tensors (a difference is a config error). 0 keeps every layer as the other keys say. auto (with
    effective_batch): the plan also times its chosen plan with a third and two thirds of the checkpointed layers
    streamed, and keeps the fastest within memory_budget_gib."""
    answer_only_logits: Literal["auto", True, False] = "auto"
    """Compute the vocabulary logits only where the loss needs them (the answer tokens) instead of at every
    position: the same loss, without a (batch x length x 151,936) fp32 tensor. false: the model's own loss.
    auto/true for this and the eight speed patches below: auto steps aside, with a log line naming the versions
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
    fused_lora_dropout: Literal["auto", True, False] = "auto"
    """Inside the fused LoRA forward, the LoRA dropout and the down-projection (x A^T) run as one Triton kernel, forward
    and backward, with the dropout mask drawn from a seed (from torch's generator, so a recomputed layer draws the
    same) instead of written to memory and read back. Checked against torch's with the same mask on the GPU before
    the first step; off by itself without a GPU or when that check fails. false: torch's dropout and GEMM."""
    positions_in_dataloader: Literal["auto", True, False] = "auto"
    """Qwen3-VL's M-RoPE position ids are computed in the dataloader workers, by transformers' own function on the
    CPU, and passed to the forward, which otherwise computes them sample by sample on the GPU with about 9 host
    synchronisations a sample. The same positions (tests). false: the forward's own."""
    batched_vision_attention: Literal["auto", True, False] = "auto"
    """The vision tower attends all images of one size in one attention call, instead of transformers' one call per
    image (its path without FlashAttention), which leaves the GPU waiting on the CPU at small images and large
    batches. The same result to rounding (tests). false: transformers' own."""
    vision_without_autocast: Literal["auto", True, False] = "auto"
    """The vision tower (frozen, bf16) runs with autocast off, as at inference. Under autocast its LayerNorms return
    float32, so its activations stay float32 and every 4-bit layer casts them to bf16 and back. Off by itself with
    fp32_upcast: true or when LoRA targets vision modules. false: the Trainer's autocast throughout."""
    deepstack_by_index: Literal["auto", True, False] = "auto"
    """The visual features that Qwen3-VL adds to the image tokens in its first decoder layers (deepstack) are added by
    index instead of through a boolean mask, whose count the host has to read (6 to 9 host synchronisations a step,
    each leaving the GPU waiting). The same sums (tests). false: transformers' own."""
    drop_padding_mask: Literal["auto", True, False] = "auto"
    """Training batches go to the model without their padding mask. Rows are padded on the right and the text
    model attends causally, so no real token can see a padding token: the same loss (tests), with the causal
    attention kernel and its grouped key/value heads instead of a masked kernel over copied heads. false: the
    mask is passed."""
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


# ---------------------------------------------------------------------------------------------------------------------
# Each group of keys' checks, on the values alone (a section's are its class's `problems`): one line per problem,
# naming the key to change. The recipe's validate_config runs them, in this order, among the checks on files.
# ---------------------------------------------------------------------------------------------------------------------


def size_problems(cfg: StageConfig) -> list[str]:
    """Rates, counts and sizes that must be > 0 (auto and null, where a key allows them, are not numbers)."""
    positive = {"lr": cfg.lr, "batch_size": 1 if cfg.batch_size == "auto" else cfg.batch_size,
                "eval_batch_size": cfg.eval_batch_size,
                "memory_budget_gib": 1 if cfg.memory_budget_gib == "auto" else cfg.memory_budget_gib,
                "effective_batch": 1 if cfg.effective_batch is None else cfg.effective_batch,
                "grad_accum": cfg.grad_accum, "lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha,
                "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels, "max_seq_len": cfg.max_seq_len,
                "logging_steps": cfg.logging_steps}
    return [f"{k} must be > 0, got {v}" for k, v in positive.items() if not v > 0]


def schedule_problems(cfg: StageConfig) -> list[str]:
    """stage, max_steps, epochs, warmup_ratio."""
    problems = []
    if cfg.stage < 1:
        problems.append(f"stage must be >= 1, got {cfg.stage}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        problems.append(f"max_steps must be > 0, or -1 to run `epochs`; got {cfg.max_steps}")
    if cfg.max_steps == -1 and not cfg.epochs > 0:
        problems.append(f"epochs must be > 0 when max_steps is -1, got {cfg.epochs}")
    if not 0 <= cfg.warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    return problems


def effective_batch_problems(cfg: StageConfig, num_processes: int) -> list[str]:
    """effective_batch plans batch_size, grad_accum, checkpointed_layers and offload_activations itself, and
    streamed_layers with auto; auto means nothing without it."""
    if cfg.effective_batch is None:
        return (["streamed_layers: auto is tried by the plan of effective_batch, which is not set; set "
                 "effective_batch, or streamed_layers to a share in [0, 1]"] if cfg.streamed_layers == "auto" else [])
    set_by_hand = {key: getattr(cfg, key) for key, default in (("batch_size", "auto"), ("grad_accum", 1),
                                                               ("checkpointed_layers", 1.0),
                                                               ("offload_activations", False))
                   if getattr(cfg, key) != default}
    problems = [f"{key}: {str(value).lower() if isinstance(value, bool) else value} is chosen by the plan when "
                "effective_batch is set; remove it (or effective_batch)" for key, value in set_by_hand.items()]
    if cfg.streamed_layers not in (0, "auto"):
        problems.append(f"streamed_layers: {cfg.streamed_layers:g} is chosen by the plan when effective_batch is set; "
                        "use auto (the plan tries streamed layers) or 0")
    if cfg.effective_batch > 0 and cfg.effective_batch % num_processes:
        problems.append(f"effective_batch ({cfg.effective_batch}) must be a multiple of the {num_processes} processes "
                        "(each takes an equal share of a step)")
    return problems


def batch_size_auto_problems(cfg: StageConfig, training: bool) -> list[str]:
    """batch_size: auto measures the GPU. Without one it is a problem for training, and a note for `--check`
    (training=False), which checks the data on any machine."""
    if cfg.batch_size != "auto" or cfg.effective_batch is not None or gpu_available():
        return []
    no_gpu = ("batch_size: auto measures GPU memory to choose the batch, and there is no GPU here; set batch_size to a "
              "number")
    if training:
        return [no_gpu]
    print_main(f"Note: {no_gpu} to train on this machine")
    return []


def checkpointing_problems(cfg: StageConfig) -> list[str]:
    """checkpointed_layers and streamed_layers (whether this transformers can checkpoint a part of the layers is
    speed's question)."""
    return [f"{key} must be in [0, 1], got {getattr(cfg, key)}" for key in ("checkpointed_layers", "streamed_layers")
            if getattr(cfg, key) != "auto" and not 0 <= getattr(cfg, key) <= 1]


def fsdp_problems(cfg: StageConfig, fsdp: bool) -> list[str]:
    """What the config asks that FSDP cannot do, when launched with it (`fsdp`)."""
    if not fsdp:
        return []
    problems = []
    if cfg.quantization.quant_storage not in ("auto", cfg.quantization.compute_dtype):
        problems.append(f"quantization.quant_storage: FSDP shards only floating-point tensors; use auto or "
                        f"{cfg.quantization.compute_dtype} (the compute dtype), not {cfg.quantization.quant_storage}")
    if cfg.batch_size == "auto":
        problems.append("batch_size: auto measures a step of the whole model, and FSDP shards it (the measure would "
                        "not hold); set batch_size to a number under FSDP")
    if cfg.optimizer_state == "resume":
        problems.append("optimizer_state: resume is not supported under FSDP (its optimizer state is sharded); use "
                        "fresh, or train this stage with DDP or one GPU")
    if cfg.streamed_layers:
        problems.append("streamed_layers: not tried under FSDP (its gathered weights and the copies would compete for "
                        "memory); set it to 0, or train with DDP or one GPU")
    return problems


def evaluation_problems(cfg: StageConfig) -> list[str]:
    """eval_questions, max_new_tokens, numeric_tolerance."""
    problems = []
    if cfg.eval_questions < -1:
        problems.append(f"eval_questions must be -1 (all), 0 (off) or a count, got {cfg.eval_questions}")
    if cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens must be > 0, got {cfg.max_new_tokens}")
    if cfg.numeric_tolerance < 0:
        problems.append(f"numeric_tolerance must be >= 0, got {cfg.numeric_tolerance}")
    return problems


def output_problems(cfg: StageConfig) -> list[str]:
    """tensorboard (its package installed), eval_steps, save_steps, dataloader_num_workers."""
    problems = []
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("tensorboard: true, but the tensorboard package is not installed (pip install tensorboard, "
                        "or set tensorboard: false)")
    for key in ("eval_steps", "save_steps", "dataloader_num_workers"):
        if getattr(cfg, key) < 0:
            problems.append(f"{key} must be >= 0, got {getattr(cfg, key)}")
    return problems


def image_problems(cfg: StageConfig) -> list[str]:
    """min_pixels against max_pixels."""
    if cfg.min_pixels > cfg.max_pixels:
        return [f"min_pixels ({cfg.min_pixels}) must not exceed max_pixels ({cfg.max_pixels})"]
    return []


def forgetting_problems(cfg: StageConfig) -> list[str]:
    """forgetting_tolerance, forgetting_action, watch_earlier_stages (replay is ReplaySettings')."""
    problems, tolerance = [], cfg.forgetting_tolerance
    if tolerance is not None and not tolerance > 0:
        problems.append(f"forgetting_tolerance must be > 0 (a relative rise: 0.1 stops or warns at 10% above the loss "
                        f"before the first step), or null for off; got {tolerance}")
    if cfg.forgetting_action == "stop" and tolerance is None:
        problems.append("forgetting_action: stop needs forgetting_tolerance (the rise at which to stop)")
    if tolerance is not None and not cfg.watch_earlier_stages:
        problems.append("forgetting_tolerance needs watch_earlier_stages: true (it is checked on their dev losses)")
    if tolerance is not None and not cfg.prev_checkpoint:
        problems.append(f"forgetting_tolerance: stage {cfg.stage} has no prev_checkpoint, so no earlier stage to "
                        "watch; remove it (or set it in the configs of stages >= 2)")
    return problems
