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

Layout: config -> data -> model -> train -> evaluate -> save, each a section below; `main()` last.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curriculum import forgetting, speed
from curriculum.batch_size import choose_batch_size
from curriculum.errors import ConfigError, CurriculumError, DiskFull, StageStopped
from curriculum.faults import (
    STAGE_START,
    StageGuard,
    complete_checkpoints,
    disk_full_error,
    end_dataloader_workers_at_exit,
    interrupted_run,
    is_disk_full,
    leave_stop_signals_to_the_trainer,
)
from curriculum.processes import (
    check_processes_agree,
    fsdp_enabled,
    gather_from_processes,
    gpu_available,
    is_main_process,
    log,
    processes,
    runtime,
    training_device,
)

speed.quiet_optional_backend_warnings()  # before bitsandbytes and Liger import: their optional backends' warnings
# peft calls a transformers method that transformers 5 renamed; the warning is about peft, not about you.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)

REPO_DIR = Path(__file__).resolve().parent
# `model_name_or_path: tiny-qwen3vl` names the random tiny Qwen3-VL that the demo and the tests use;
# it is built here on first use (tiny_qwen3vl.py) and then loaded like any local checkpoint.
TINY_MODEL_NAME = "tiny-qwen3vl"
TINY_MODEL_DIR = REPO_DIR / "models" / TINY_MODEL_NAME

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGE_METRICS = "stage_metrics.json"
IMAGE_CHECK_CACHE = "image_checks.json"
RESOLVED_CONFIG = "resolved_config.yaml"
OPTIMIZER_MOMENTS = "optimizer_moments.safetensors"
IGNORE_INDEX = -100  # label value that the loss skips (prompt, image and padding positions)

SPLIT_FILE_SUFFIXES = (".jsonl", ".parquet", ".arrow")  # JSONL, or a Hugging Face dataset (also: a folder)
QUESTION_TYPES = ("single_choice", "numeric", "multi_label")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# ---------------------------------------------------------------------------------------------------------------------
# Config: typed dataclasses from YAML; unknown keys rejected with the closest valid key
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
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
    """single_choice, numeric or multi_label."""
    options: str = "options"
    """The answer options (a list of strings; empty or null for numeric)."""
    answer: str = "answer"
    """The gold answer: a letter, a number, or letters (a list, or in a table column also text: `A, C`)."""
    image: str = "image"
    """The image: an `Image` column (its bytes or its file), or a path relative to the data file."""
    messages: str = "messages"
    """Chat records instead: the conversation, the assistant's answer last."""
    images: str = "images"
    """Chat records: the list of (at most one) image."""


@dataclass
class StageConfig:
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
    batch_size_chosen; effective batch = that x grad_accum x processes). A number fixes it."""
    memory_budget_gib: float = 20.0
    """GPU memory per process that batch_size: auto may fill; 20 fits a 24 GB card (a GPU with less uses its own
    size). Steps on the longest samples are measured at 4 and 8; the line through them gives a size, and up to 3
    more measured steps narrow it down. 90% of the budget is used (headroom for fragmentation and evaluation)."""
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
    spread): 1.0 all, 0.5 every other. Lower is faster and takes more memory."""
    answer_only_logits: Literal["auto", True, False] = "auto"
    """Compute the vocabulary logits only where the loss needs them (the answer tokens) instead of at every
    position: the same loss, without a (batch x length x 151,936) fp32 tensor. false: the model's own loss.
    auto/true for this and the three speed patches below: auto steps aside, with a log line naming the versions
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


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(valid)})"


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` if it fits `annotation` (ints are accepted as floats), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for inner in [a for a in args if a is not type(None)]:  # the first that fits (`int | Literal["auto"]`)
            try:
                return _check_type(value, inner, where)
            except ConfigError as err:
                problems.append(str(err).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: " + "; or ".join(problems))
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1 is not True here
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(f"{where}: expected a list of {args[0].__name__}, got {value!r}")
        return list(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is plainly a number
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_dataclass(cls: type, data: dict, where: str) -> Any:
    """Turn a YAML mapping into `cls`, rejecting unknown keys and wrong types, naming each by its dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems, values = [], {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append(f"unknown key '{path}'{_closest(str(key), list(fields))}")
            continue
        try:
            if dataclasses.is_dataclass(hints[key]):
                values[key] = _build_dataclass(hints[key], value, path)
            else:
                values[key] = _check_type(value, hints[key], path)
        except ConfigError as err:
            problems.append(str(err))
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    problems += [f"missing required key '{f'{where}.' if where else ''}{n}'" for n in missing]
    if problems:
        raise ConfigError("\n".join(problems))
    return cls(**values)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=value` overrides (values parsed as YAML: `--set lr=1e-4`, `--set lora.r=8`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set lr=1e-4")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
    """Read a stage YAML (safely: no object construction), apply overrides, type-check every key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    try:
        return _build_dataclass(StageConfig, apply_overrides(data, list(overrides)), "")
    except ConfigError as err:
        raise ConfigError(f"{path}:\n" + "\n".join(f"  - {line}" for line in str(err).splitlines())) from None


def config_to_dict(cfg: StageConfig) -> dict:
    return dataclasses.asdict(cfg)


def read_adapter_lora(adapter_dir: str | os.PathLike) -> dict:
    """The LoRA settings that a saved adapter was trained with, in this config's names."""
    saved = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    targets = saved.get("target_modules")
    return {"r": saved.get("r"), "alpha": saved.get("lora_alpha"), "dropout": saved.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def extra_adapters(adapter_dir: str | os.PathLike) -> list[str]:
    """Names of adapters saved beside `default`: peft writes each one into a sub-directory named after it."""
    return sorted(p.parent.name for p in Path(adapter_dir).glob(f"*/{ADAPTER_CONFIG}"))


def adapter_tensor_shapes(adapter_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Name -> shape of each tensor in the adapter's safetensors file, from the file's header (no weights read)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="numpy") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def adapter_file_problems(adapter_dir: str | os.PathLike, expected: LoraSettings | None = None,
                          expected_source: str = "") -> list[str]:
    """Why the adapter saved in `adapter_dir` cannot load as the LoRA its adapter_config.json describes, one line
    each, none if it can. Reads the JSON and the tensor shapes, no weights and no model: a hand-edited config is
    named in a second, not as a size mismatch from deep inside the model load. With `expected` (the LoRA settings
    from `expected_source`, e.g. the stage's resolved_config.yaml) the tensors are held against those too."""
    adapter_dir = Path(adapter_dir)
    try:
        saved = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        return [f"no {ADAPTER_CONFIG}"]
    except ValueError as err:  # not JSON, or not even text
        return [f"{ADAPTER_CONFIG} is not valid JSON ({err})"]
    if not isinstance(saved, dict):
        return [f"{ADAPTER_CONFIG} holds a JSON {type(saved).__name__}, not an object"]
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        return [f"no {ADAPTER_WEIGHTS}"]
    try:
        shapes = adapter_tensor_shapes(adapter_dir)
    except Exception as err:  # safetensors raises its own error types for a corrupt header or a cut-short file
        return [f"{ADAPTER_WEIGHTS} is unreadable (truncated or corrupt?): {' '.join(str(err).split())}"]

    # peft names a tensor <module path>.lora_A.weight (shape r x in) and <module path>.lora_B.weight (out x r)
    ranks_by_module: dict[str, dict[str, int]] = {}
    problems = []
    for name, shape in shapes.items():
        for part, rank_dim in (("lora_A", 0), ("lora_B", 1)):
            if f".{part}." in name:
                if len(shape) < 2:
                    problems.append(f"{ADAPTER_WEIGHTS}: {name} has shape {shape}, not a matrix")
                    continue
                ranks_by_module.setdefault(name.split(f".{part}.")[0], {})[part] = shape[rank_dim]
    if not ranks_by_module:
        return problems or [f"{ADAPTER_WEIGHTS} holds no LoRA tensors"]
    problems += [f"{ADAPTER_WEIGHTS}: {module} has {' and '.join(pair)} only"
                 for module, pair in ranks_by_module.items() if len(pair) != 2][:3]
    problems += [f"{ADAPTER_WEIGHTS}: {module} has lora_A of rank {pair['lora_A']} and lora_B of rank "
                 f"{pair['lora_B']}" for module, pair in ranks_by_module.items()
                 if len(pair) == 2 and pair["lora_A"] != pair["lora_B"]][:3]
    ranks = sorted({rank for pair in ranks_by_module.values() for rank in pair.values()})
    tensor_rank = " and ".join(map(str, ranks))
    modules = list(ranks_by_module)
    adapted = sorted({module.rsplit(".", 1)[-1] for module in modules})  # q_proj, ...: what the YAML names

    def same_targets(targets: list[str]) -> bool:
        """Each target adapts a module and each module is a target's, matched as peft matches a list of targets: a
        module is targeted when its path is the target or ends with '.' + the target."""
        matched = [(m, t) for m in modules for t in targets if m == t or m.endswith("." + t)]
        return {t for _, t in matched} == set(targets) and {m for m, _ in matched} == set(modules)

    r, targets = saved.get("r"), saved.get("target_modules")
    if not isinstance(r, int) or r < 1:
        problems.append(f"{ADAPTER_CONFIG} has no valid r (got {r!r})")
    elif ranks != [r] and not saved.get("rank_pattern"):  # a rank_pattern gives modules their own ranks
        problems.append(f"{ADAPTER_CONFIG} says r={r}, the tensors have rank {tensor_rank}")
    if isinstance(targets, list) and not same_targets(targets):  # a string is a regex, left to peft
        problems.append(f"{ADAPTER_CONFIG} targets {','.join(sorted(targets))}, the tensors adapt {','.join(adapted)}")
    if expected is not None:
        if ranks != [expected.r]:
            problems.append(f"{expected_source} says lora.r={expected.r}, the tensors have rank {tensor_rank}")
        if not same_targets(list(expected.target_modules)):
            problems.append(f"{expected_source} says lora.target_modules="
                            f"{','.join(sorted(expected.target_modules))}, the tensors adapt {','.join(adapted)}")
    return problems


def curriculum_stage_dirs(root: str | os.PathLike) -> list[Path]:
    """The finished stage directories under `root` (those with stage_metrics.json), in their recorded stage order."""
    stages = [p.parent for p in Path(root).glob(f"*/{STAGE_METRICS}")]
    return sorted(stages, key=lambda p: json.loads((p / STAGE_METRICS).read_text()).get("stage", 0))


def lora_mismatches(expected: LoraSettings, saved: dict) -> list[str]:
    """Differences between the YAML's LoRA settings and a saved adapter's, one line each."""
    want = {"r": expected.r, "alpha": expected.alpha, "dropout": expected.dropout,
            "target_modules": sorted(expected.target_modules)}
    return [f"lora.{k}: the YAML says {want[k]!r}, the saved adapter has {saved[k]!r}"
            for k in want if want[k] != saved[k]]


def validate_config(cfg: StageConfig, training: bool = True) -> None:
    """Every problem in one error, each line naming the key to change; runs before anything heavy loads.
    training=False (`--check`): what only training needs (a GPU for batch_size: auto) is a note, not a problem."""
    problems = []
    positive = {"lr": cfg.lr, "batch_size": 1 if cfg.batch_size == "auto" else cfg.batch_size,
                "eval_batch_size": cfg.eval_batch_size, "memory_budget_gib": cfg.memory_budget_gib,
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
    if cfg.batch_size == "auto" and not gpu_available():
        no_gpu = ("batch_size: auto measures GPU memory to choose the batch, and there is no GPU here; set "
                  "batch_size to a number")
        if training:
            problems.append(no_gpu)
        else:
            log(f"Note: {no_gpu} to train on this machine")
    if not 0 <= cfg.checkpointed_layers <= 1:
        problems.append(f"checkpointed_layers must be in [0, 1], got {cfg.checkpointed_layers}")
    if cfg.fp32_upcast is False and cfg.quantization.compute_dtype == "float16":
        problems.append("quantization.compute_dtype: float16 needs fp32_upcast: true (fp16 norms overflow); "
                        "or use bfloat16")
    if fsdp_enabled() and cfg.quantization.quant_storage not in ("auto", cfg.quantization.compute_dtype):
        problems.append(f"quantization.quant_storage: FSDP shards only floating-point tensors; use auto or "
                        f"{cfg.quantization.compute_dtype} (the compute dtype), not {cfg.quantization.quant_storage}")
    if fsdp_enabled() and cfg.batch_size == "auto":
        problems.append("batch_size: auto measures a step of the whole model, and FSDP shards it (the measure would "
                        "not hold); set batch_size to a number under FSDP")
    if fsdp_enabled() and cfg.optimizer_state == "resume":
        problems.append("optimizer_state: resume is not supported under FSDP (its optimizer state is sharded); use "
                        "fresh, or train this stage with DDP or one GPU")
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
    for key in ("train_file", "eval_file", "test_file"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            problems.append(f"{key}: file not found: {value}")
        elif value is not None and Path(value).is_file() and Path(value).suffix not in SPLIT_FILE_SUFFIXES:
            problems.append(f"{key}: {value} is not a split the trainer reads: a .jsonl, .parquet or .arrow file, or "
                            "a dataset folder")
    named = dataclasses.asdict(cfg.columns)
    for column in sorted({c for c in named.values() if list(named.values()).count(c) > 1}):
        problems.append(f"columns: '{column}' is named for {', '.join(k for k, c in named.items() if c == column)}; "
                        "each field has a column of its own")
    if cfg.stage >= 2 and not cfg.prev_checkpoint:
        problems.append(f"stage {cfg.stage} needs prev_checkpoint: the adapter of stage {cfg.stage - 1} to continue")
    if cfg.stage == 1 and cfg.prev_checkpoint and not cfg.continue_at_stage_1:
        problems.append("stage 1 makes a new adapter: remove prev_checkpoint, set stage: 2 to continue it, or set "
                        "continue_at_stage_1: true to continue it as stage 1")
    if cfg.prev_checkpoint:
        prev = Path(cfg.prev_checkpoint)
        if not prev.is_dir():
            problems.append(f"prev_checkpoint: directory not found: {prev}")
        elif not (prev / ADAPTER_CONFIG).is_file() or not (prev / ADAPTER_WEIGHTS).is_file():
            problems.append(f"prev_checkpoint: {prev} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
        else:
            # A damaged adapter is refused here, naming the file, rather than as a size mismatch inside the load.
            file_problems = adapter_file_problems(prev)
            problems += [f"prev_checkpoint: {prev}: {line}" for line in file_problems]
            if not file_problems:  # (an adapter_config.json that does not read has no settings to compare)
                problems += [f"prev_checkpoint: {line}" for line in lora_mismatches(cfg.lora, read_adapter_lora(prev))]
            nested = extra_adapters(prev)
            if nested:
                problems.append(f"prev_checkpoint: {prev} holds more than one adapter (also: {', '.join(nested)})")
            if cfg.optimizer_state == "resume" and not (prev / OPTIMIZER_MOMENTS).is_file():
                problems.append(f"optimizer_state: resume, but {prev} has no {OPTIMIZER_MOMENTS}")
        if prev.resolve() == Path(cfg.output_dir).resolve():
            problems.append("output_dir must differ from prev_checkpoint: a stage never overwrites the one it "
                            "continues")
    elif cfg.optimizer_state == "resume":
        problems.append("optimizer_state: resume needs a prev_checkpoint to take the moments from")
    # forgetting_tolerance, forgetting_action, replay (curriculum/forgetting.py): reads the lineage, hashes files
    problems += forgetting.config_problems(cfg, previous_stage_metrics, previous_stage_dir, split_sha256)
    out = Path(cfg.output_dir)
    if (out / STAGE_METRICS).is_file() and not cfg.overwrite:
        problems.append(f"output_dir: {out} already holds a finished stage; choose another or set overwrite: true")
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------------------------------
# Data: record -> messages -> token ids + labels; pure functions, tested with the real tokenizer
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One question. `prompt_messages` end with the user turn; `answer` is the assistant's exact reply text."""
    id: str
    type: str
    image: str | None
    prompt_messages: list
    answer: str
    source: str  # "file:line", for error messages
    options: list | None = None


def format_question(question: str, qtype: str, options: list | None) -> str:
    """The user text: the question, lettered options, and how to answer."""
    if qtype == "numeric":
        return f"{question}\nAnswer with a number."
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    if qtype == "single_choice":
        return "\n".join(lines) + "\nAnswer with the option's letter."
    return "\n".join(lines) + "\nAnswer with the letters of all correct options, separated by commas."


def format_answer(answer: Any, qtype: str) -> str:
    """The assistant's target text: `B`, `3`, `A, C`."""
    if qtype == "multi_label":
        return ", ".join(sorted(answer))
    return str(answer).strip()


def _image_path(base_dir: Path, image: str, source: str, allow_outside: bool) -> str:
    """The image's path, relative to the JSONL file's folder; refused if it leads outside it (unless allowed).
    The check is on the path as written (`..`, absolute paths), so a symlinked data folder still works."""
    path = os.path.normpath(base_dir / image)
    if not allow_outside and os.path.commonpath([os.path.abspath(path), os.path.abspath(base_dir)]) != \
            os.path.abspath(base_dir):
        raise ConfigError(f"{source}: image path {image!r} leads outside the data folder {base_dir}; move the "
                          "image inside it, or set allow_images_outside_data_dir: true")
    return path


def _vqa_record(obj: dict, source: str, image_of) -> tuple[str, str | None, str, str]:
    """Check a VQA record's fields; return (type, image path, user text, answer text). `image_of(cell, source)`
    turns the image field into a path (and checks it)."""
    missing = [k for k in ("id", "question", "type", "answer") if k not in obj]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    qtype, options, answer = obj["type"], obj.get("options"), obj["answer"]
    if qtype not in QUESTION_TYPES:
        raise ConfigError(f"{source}: unknown question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}")
    if qtype != "numeric":
        if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
            raise ConfigError(f"{source}: a {qtype} question needs a list of 2 to 26 options")
        letters = OPTION_LETTERS[:len(options)]
        given = answer if qtype == "multi_label" else [answer]
        if not isinstance(given, list) or not given or any(a not in letters for a in given):
            raise ConfigError(f"{source}: answer {answer!r} is not among the options' letters {', '.join(letters)}")
    elif isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ConfigError(f"{source}: a numeric answer must be a number, got {answer!r}")
    image = image_of(obj["image"], source) if obj.get("image") else None
    return qtype, image, format_question(obj["question"], qtype, options), format_answer(answer, qtype)


def _chat_record(obj: dict, source: str, image_of) -> tuple[str | None, list, str]:
    """The chat format other tools write: {"messages": [...], "images": [...]}, `<image>` in the user text."""
    messages, images = obj["messages"], obj.get("images") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(f"{source}: the last message must be the assistant's answer")
    if len(images) > 1:
        raise ConfigError(f"{source}: one image per record is supported, got {len(images)}")
    prompt = []
    for msg in messages[:-1]:
        text = msg.get("content", "")
        if not isinstance(text, str):
            raise ConfigError(f"{source}: message content must be a string in the chat format")
        if "<image>" in text:
            before, _, after = text.partition("<image>")
            content = [c for c in ({"type": "text", "text": before} if before else None, {"type": "image"},
                                   {"type": "text", "text": after} if after else None) if c]
            prompt.append({"role": msg["role"], "content": content})
        else:
            prompt.append({"role": msg["role"], "content": [{"type": "text", "text": text}]})
    image = image_of(images[0], source) if images else None
    return image, prompt, str(messages[-1]["content"]).strip()


def record_from_fields(obj: dict, source: str, default_id: Any, system_prompt: str | None, image_of) -> Record:
    """One JSONL line or dataset row, its fields under our names, as a Record; a ConfigError naming `source`."""
    if "messages" in obj:
        image, prompt, answer = _chat_record(obj, source, image_of)
        return Record(str(obj.get("id", default_id)), "chat", image, prompt, answer, source)
    qtype, image, text, answer = _vqa_record(obj, source, image_of)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    prompt = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt
              else []) + [{"role": "user", "content": content}]
    return Record(str(obj["id"]), qtype, image, prompt, answer, source, obj.get("options"))


def fields_by_our_names(row: dict, columns: DataColumns) -> dict:
    """A line's or row's fields under the names the checks use, found under the names `columns:` gives them."""
    ours_by_theirs = {theirs: ours for ours, theirs in dataclasses.asdict(columns).items()}
    return {ours_by_theirs[k]: v for k, v in row.items() if k in ours_by_theirs}


def read_records(path: str | os.PathLike, system_prompt: str | None = None, allow_outside: bool = False,
                 columns: DataColumns | None = None, image_dir: Path | None = None) -> tuple[list[Record], list[str]]:
    """Parse a split: (the valid Records, one `file:line: problem` per invalid line). Images not opened. A path
    that is not a .jsonl file is a Hugging Face dataset (read_dataset_records; its images stored as bytes are
    written to `image_dir`)."""
    path, columns = Path(path), columns or DataColumns()
    if path.suffix != ".jsonl":
        return read_dataset_records(path, system_prompt, allow_outside, columns, image_dir)
    base_dir, records, problems = path.parent, [], []

    def image_of(image: str, source: str) -> str:
        return _image_path(base_dir, image, source, allow_outside)

    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{line_no}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{source}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{source}: expected a JSON object")
            records.append(record_from_fields(fields_by_our_names(obj, columns), source, line_no, system_prompt,
                                              image_of))
        except ConfigError as err:
            problems.append(str(err))
    return records, problems


def open_dataset(path: Path):
    """A split of a Hugging Face dataset: a .parquet or .arrow file, a folder written by `save_to_disk`, or a folder
    `load_dataset` reads (parquet files, or `imagefolder` images with a metadata.jsonl). One split only."""
    import datasets

    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
        elif path.is_dir():
            dataset = datasets.load_dataset(str(path))
        elif path.suffix in (".parquet", ".arrow"):
            dataset = datasets.load_dataset(path.suffix[1:], data_files=str(path))
        else:
            raise ConfigError(f"{path}: not a split the trainer reads: a .jsonl, .parquet or .arrow file, or a "
                              "dataset folder")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets and pyarrow raise many types for a file they cannot read
        raise ConfigError(f"{path}: cannot be read as a Hugging Face dataset ({type(err).__name__}: {err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise ConfigError(f"{path} holds the splits {', '.join(dataset)}; name one split's file or folder")
        dataset = next(iter(dataset.values()))
    return dataset


def write_image_bytes(data: bytes, image_dir: Path, name: str | None) -> str:
    """An image stored inside a dataset, as a file: written once under `image_dir`, named by its SHA-256 (an image
    met again, in this split or another, is the same file), through a temporary name so that a reader never sees
    half of it."""
    target = image_dir / f"{hashlib.sha256(data).hexdigest()}{Path(name).suffix.lower() if name else ''}"
    if not target.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(target)
    return str(target)


def read_dataset_records(path: Path, system_prompt: str | None, allow_outside: bool, columns: DataColumns,
                         image_dir: Path | None) -> tuple[list[Record], list[str]]:
    """read_records for a Hugging Face dataset: the same checks, problems named `file:row N` (N counts from 0, as
    `dataset[N]`). An image cell holds bytes (an `Image` column written by `datasets`), which become a file in
    `image_dir`, so that the image checks, the cache of checked images and the dataloader workers treat it as a
    JSONL image; or a path (an `Image` column of files, or text), checked as a JSONL image path."""
    dataset = open_dataset(path)
    names = dataclasses.asdict(columns)
    if names["messages"] not in dataset.column_names:
        lacking = [f"'{names[k]}' (columns.{k})" for k in ("id", "question", "type", "answer")
                   if names[k] not in dataset.column_names]
        if lacking:
            raise ConfigError(f"{path}: no column {', '.join(lacking)}; its columns are "
                              f"{', '.join(dataset.column_names)}. Name yours under `columns:` in the config")
    base_dir = path if path.is_dir() else path.parent
    stored = set()  # the images stored in the dataset, as the files they were written to

    def image_of(cell: Any, source: str) -> str | None:
        if isinstance(cell, dict) and cell.get("bytes"):
            if image_dir is None:
                raise ValueError("image_dir is needed to read images stored in a dataset")
            image = write_image_bytes(cell["bytes"], image_dir, cell.get("path"))
            stored.add(image)
            return image
        cell = cell.get("path") if isinstance(cell, dict) else cell
        if cell is None:  # an Image cell with neither bytes nor a file: no image
            return None
        if not isinstance(cell, str):
            raise ConfigError(f"{source}: the image is neither an image nor a path: {type(cell).__name__}")
        return _image_path(base_dir, cell, source, allow_outside)

    records, problems = [], []
    # arrow rows as stored: images as {bytes, path}, not decoded here (a broken one is found by the image check)
    rows = (cells for batch in dataset.with_format("arrow").iter(batch_size=1000) for cells in batch.to_pylist())
    for row, cells in enumerate(rows):
        source = f"{path}:row {row}"
        obj = fields_by_our_names({k: v for k, v in cells.items() if v is not None}, columns)
        if obj.get("type") == "multi_label" and isinstance(obj.get("answer"), str):
            obj["answer"] = [a.strip() for a in obj["answer"].split(",")]  # a table column holds one type
        try:
            records.append(record_from_fields(obj, source, row, system_prompt, image_of))
        except ConfigError as err:
            problems.append(str(err))
    if stored:
        log(f"{path}: {len(stored)} images stored in the dataset, read from their files in {image_dir}")
    return records, problems


def bad_records_error(path: str | os.PathLike, problems: list[str], shown: int = 20) -> ConfigError:
    listed = "\n".join(f"  {p}" for p in problems[:shown])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return ConfigError(f"{len(problems)} bad record(s) in {path}:\n{listed}{more}\n"
                       "Fix them, or set on_bad_record: skip to train without them.")


def load_records(path: str | os.PathLike, system_prompt: str | None = None, allow_outside: bool = False,
                 columns: DataColumns | None = None, image_dir: Path | None = None) -> list[Record]:
    """Parse a split (JSONL or a dataset) into Records; any problem is an error naming every bad file:line."""
    records, problems = read_records(path, system_prompt, allow_outside, columns, image_dir)
    if problems:
        raise bad_records_error(path, problems)
    if not records:
        raise ConfigError(f"{path}: no records")
    return records


def with_image_settings(messages: list, image_path: str | None, min_pixels: int, max_pixels: int) -> list:
    """Messages with the image path and the pixel budget inside the image item, as qwen_vl_utils reads them."""
    out = []
    for msg in messages:
        content = [dict(c, image=image_path, min_pixels=min_pixels, max_pixels=max_pixels)
                   if c.get("type") == "image" else c for c in msg["content"]]
        out.append({"role": msg["role"], "content": content})
    return out


def mask_prompt_tokens(input_ids: list[int], prompt_len: int) -> list[int]:
    """Labels: the prompt (system, user turn, image tokens, `<|im_start|>assistant\\n`) masked to -100.

    The boundary is the prompt's length in tokens, measured on the rendered template itself; searching
    for the "assistant" token instead leaks prompt text whenever a question contains that word.
    """
    if not 0 < prompt_len < len(input_ids):
        raise ValueError(f"prompt of {prompt_len} tokens leaves no answer in a sample of {len(input_ids)}")
    return [IGNORE_INDEX] * prompt_len + list(input_ids[prompt_len:])


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """The assistant's reply as trained: the answer text and `<|im_end|>` (the stop token)."""
    return tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]


def image_token_count(width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """Image tokens for an image of this size: one per 32x32 pixels after Qwen's resize (patch 16, merge 2)."""
    from qwen_vl_utils import smart_resize

    h, w = smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // 32) * (w // 32)


def _decode_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # the whole file: a header alone does not show truncation
            return img.size, None
    except FileNotFoundError:
        return None, f"image not found: {path}"
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, f"cannot read image {path}: {err}"


def image_check_key(path: str) -> str | None:
    """What identifies one version of an image file: its absolute path, byte size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def read_image_check_cache(cache: Path | None) -> dict:
    """{image_check_key: [w, h]} of the images that decoded cleanly before; empty without a cache or when it is
    unreadable (it is only ever a shortcut: an image not in it is decoded again)."""
    if cache is None or not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def write_image_check_cache(cache: Path, known: dict) -> None:
    """Written by the main process, whole and then renamed into place, so a reader never sees half a file."""
    if not is_main_process():
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    except OSError as err:  # a full or read-only disk costs the shortcut, never the run
        log(f"WARNING: could not write the image check cache {cache}: {err}")


def check_images(paths: list[str], desc: str = "Decoding images", cache: Path | None = None) -> tuple[dict, dict]:
    """Decode every image fully, in threads (PIL releases the GIL while decoding), so a missing, corrupt or
    truncated image stops the run now rather than at step 9,000. Returns ({path: (w, h)}, {path: problem}).
    With a cache file, images that decoded cleanly before (same path, size and modification time) are taken
    from it, and the newly decoded ones are added."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile
    from tqdm.auto import tqdm

    t = time.perf_counter()
    known = read_image_check_cache(cache)
    keys = {p: image_check_key(p) for p in paths}
    sizes = {p: tuple(known[keys[p]]) for p in paths if keys[p] in known}
    todo = [p for p in paths if p not in sizes]
    # Some libraries set this to accept truncated files silently; a training set must not.
    allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(tqdm(pool.map(_decode_image, todo), total=len(todo), desc=desc, unit="img",
                                disable=len(todo) < 500, leave=False))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed
    decoded = {p: size for p, (size, _) in zip(todo, results, strict=True) if size}
    problems = {p: why for p, (_, why) in zip(todo, results, strict=True) if why}
    if cache is not None and decoded:
        write_image_check_cache(cache, known | {keys[p]: list(size) for p, size in decoded.items() if keys[p]})
    if cache is not None and paths:
        log(f"{desc}: {len(todo)} decoded, {len(sizes)} known to decode cleanly ({cache}), "
            f"{time.perf_counter() - t:.1f} s")
    return sizes | decoded, problems


def image_check_cache(cfg: StageConfig) -> Path | None:
    """Where the images that decoded cleanly are remembered: beside the stages of the curriculum, so every stage
    and rerun shares it."""
    return Path(cfg.output_dir).resolve().parent / ".cache" / IMAGE_CHECK_CACHE if cfg.cache_image_checks else None


def dataset_image_dir(cfg: StageConfig) -> Path:
    """Where images stored inside a dataset (an `Image` column's bytes) are written as files: beside the stages of
    the curriculum, as the image check cache, named by content so that every stage and rerun shares them."""
    return Path(cfg.output_dir).resolve().parent / ".cache" / "dataset_images"


def inspect_images(records: list[Record], split: str = "", cache: Path | None = None) -> tuple[dict, list[str]]:
    """Every image of a split decoded once: ({path: (w, h)}, one `file:line: problem` per record with a bad one)."""
    paths = sorted({r.image for r in records if r.image})
    sizes, bad = check_images(paths, f"Decoding {split} images" if split else "Decoding images", cache)
    return sizes, [f"{r.source}: {bad[r.image]}" for r in records if r.image in bad]


def sample_lengths(records: list[Record], processor, cfg: StageConfig, sizes: dict | None = None) -> list[int]:
    """Each record's length in tokens, image tokens included, computed from the image sizes (no pixels needed)."""
    if sizes is None:
        sizes, problems = inspect_images(records)
        if problems:
            raise ConfigError(problems[0])
    lengths = []
    for rec in records:
        text = processor.apply_chat_template(rec.prompt_messages, add_generation_prompt=True, tokenize=False)
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n += len(answer_token_ids(processor.tokenizer, rec.answer))
        if rec.image:
            n += image_token_count(*sizes[rec.image], cfg.min_pixels, cfg.max_pixels) - 1
        lengths.append(n)
    return lengths


def describe_split(split: str, records: list[Record], sizes: dict, lengths: list[int], cfg: StageConfig) -> list[str]:
    """The summary lines `--check` (and every stage) prints: types, image sizes, resizing, lengths. Resizing is
    said here, once per split, rather than once per image."""
    from qwen_vl_utils import smart_resize

    counts = {t: sum(r.type == t for r in records) for t in sorted({r.type for r in records})}
    lines = [f"{split}: {len(records)} samples ({', '.join(f'{n} {t}' for t, n in counts.items())})"]
    used = sorted((sizes[path] for path in {r.image for r in records if r.image}), key=lambda wh: wh[0] * wh[1])
    if used:
        median = used[len(used) // 2]
        lines.append(f"{split} images: {len(used)} decoded, {used[0][0]}x{used[0][1]} to {used[-1][0]}x{used[-1][1]} "
                     f"(median {median[0]}x{median[1]})")
        for label, hit, pixels in (("over max_pixels", [s for s in used if s[0] * s[1] > cfg.max_pixels],
                                    cfg.max_pixels),
                                   ("under min_pixels", [s for s in used if s[0] * s[1] < cfg.min_pixels],
                                    cfg.min_pixels)):
            if hit:
                w, h = hit[-1] if label.startswith("over") else hit[0]
                nh, nw = smart_resize(h, w, factor=32, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
                lines.append(f"{split} images: {len(hit)} of {len(used)} are {label}={pixels} and are resized "
                             f"(e.g. {w}x{h} -> {nw}x{nh})")
    ordered = sorted(lengths)
    lines.append(f"{split} lengths: {ordered[0]} to {ordered[-1]} tokens (median {ordered[len(ordered) // 2]}), "
                 f"max_seq_len {cfg.max_seq_len}")
    return lines


def drop_overlong(records: list[Record], lengths: list[int], cfg: StageConfig, split: str) -> list[Record]:
    """Never truncate through image tokens: an over-long sample is an error naming it, or skipped if configured."""
    too_long = [(r, n) for r, n in zip(records, lengths, strict=True) if n > cfg.max_seq_len]
    if too_long and cfg.on_overlong == "error":
        first, n = too_long[0]
        raise ConfigError(f"{first.source}: record {first.id!r} is {n} tokens, over max_seq_len={cfg.max_seq_len} "
                          f"({len(too_long)} such in {split}); raise max_seq_len, lower max_pixels, or set "
                          "on_overlong: skip")
    if too_long:
        log(f"Skipped {len(too_long)} {split} samples over max_seq_len={cfg.max_seq_len}: "
            + ", ".join(r.id for r, _ in too_long[:10]) + (" ..." if len(too_long) > 10 else ""))
    keep = {id(r) for r, n in zip(records, lengths, strict=True) if n <= cfg.max_seq_len}
    return [r for r in records if id(r) in keep]


def prompt_and_images(processor, rec: Record, min_pixels: int, max_pixels: int) -> tuple[str, list]:
    """A record's prompt as the model reads it (chat template, up to the assistant's turn) and its images, decoded
    and resized: the same for training (encode_example) and for answering (vqa_eval.GenerationInputs)."""
    from qwen_vl_utils import process_vision_info

    messages = with_image_settings(rec.prompt_messages, rec.image, min_pixels, max_pixels)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, process_vision_info(messages, image_patch_size=16)[0] if rec.image else []


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
        end_dataloader_workers_at_exit()
        self.records, self.processor = records, processor
        self.bad_records: list[str] = []  # `file:line: problem` of the records skipped (on_bad_record: skip)
        self.lengths: list[int] | None = None  # tokens per record, when load_split measured them
        self.min_pixels, self.max_pixels = cfg.min_pixels, cfg.max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        leave_stop_signals_to_the_trainer()
        return encode_example(self.processor, self.records[i], self.min_pixels, self.max_pixels)


def collate_batch(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest sample: ids with pad, labels with -100, masks with 0; concatenate image patches."""
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
    return batch


def load_split(path: str, processor, cfg: StageConfig, split: str) -> VQADataset:
    """Records parsed and every image decoded once; bad records stop the run (listed) or are skipped (counted)."""
    records, problems = read_records(path, cfg.system_prompt, cfg.allow_images_outside_data_dir, cfg.columns,
                                     dataset_image_dir(cfg))
    sizes, image_problems = inspect_images(records, split, image_check_cache(cfg))
    problems += image_problems
    if problems and cfg.on_bad_record == "error":
        raise bad_records_error(path, problems)
    if problems:
        records = [r for r in records if not r.image or r.image in sizes]  # bad lines never became records
        log(f"Skipped {len(problems)} bad {split} record(s) (on_bad_record: skip):\n"
            + "\n".join(f"  {p}" for p in problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    if not records:
        raise ConfigError(f"{path}: no usable records")
    lengths = sample_lengths(records, processor, cfg, sizes)
    kept = drop_overlong(records, lengths, cfg, split)
    if not kept:
        raise ConfigError(f"{path}: every sample is over max_seq_len={cfg.max_seq_len}")
    log(f"Loaded {split} from {path}:")
    log("\n".join("  " + line for line in describe_split(split, records, sizes, lengths, cfg)))
    dataset = VQADataset(kept, processor, cfg)
    dataset.bad_records = problems
    dataset.lengths = [n for r, n in zip(records, lengths, strict=True) if n <= cfg.max_seq_len]
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Model: 4-bit base once, k-bit preparation once, then a new adapter (stage 1) or the previous one, trainable
# ---------------------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """`tiny-qwen3vl` -> the local tiny model (built on first use); anything else is returned as given."""
    if name_or_path != TINY_MODEL_NAME:
        return name_or_path
    with processes().main_process_first():  # one process builds it; the others wait, then find it built
        if not (TINY_MODEL_DIR / "config.json").is_file():
            from tiny_qwen3vl import build_random_qwen3vl

            log(f"Building the tiny random Qwen3-VL at {TINY_MODEL_DIR} (first use, a few seconds)")
            build_random_qwen3vl(TINY_MODEL_DIR, shape="tiny", seed=0)
    return str(TINY_MODEL_DIR)


def from_pretrained_checked(auto_class, model_path: str, cfg: StageConfig, **kwargs):
    """`auto_class.from_pretrained` with trust_remote_code passed explicitly (off unless the config turns it on);
    a checkpoint that needs its own code is then a config error, not a traceback."""
    try:
        return auto_class.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"model_name_or_path: {model_path} ships its own Python code, which is not run unless "
                          "trust_remote_code: true. Turn it on only if you trust that checkpoint.") from None


def load_processor(model_path: str, cfg: StageConfig):
    """The Qwen3-VL processor with the config's pixel budget set on the image processor itself.

    Passing `max_pixels=` to the processor call is silently ignored by some transformers versions; the
    image processor's `size` (shortest_edge = min pixels, longest_edge = max pixels) is always honoured.
    """
    from transformers import AutoProcessor

    processor = from_pretrained_checked(AutoProcessor, model_path, cfg)
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    return processor


def quant_storage_dtype(q: QuantizationSettings) -> str:
    """`auto`: the compute dtype under FSDP (it shards only floating-point tensors), else bitsandbytes' uint8."""
    if q.quant_storage != "auto":
        return q.quant_storage
    return q.compute_dtype if fsdp_enabled() else "uint8"


def bnb_config(q: QuantizationSettings):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, quant_storage_dtype(q)))


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
    log(f"Loaded 4-bit {cfg.quantization.quant_type} base {model_path} in {time.time() - t0:.1f}s "
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

    log("Creating a new LoRA adapter (stage 1)")
    set_seed(seed)
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))


def continue_adapter(model, prev_checkpoint: str):
    """Stage >= 2: reopen the previous stage's adapter *for training*. No merge, no second k-bit preparation,
    no second adapter: the weights that train now are the very ones the previous stage saved."""
    from peft import PeftModel

    log("*** CURRICULUM LEARNING MODE ***")
    log(f"Continuing training from previous checkpoint: {prev_checkpoint}")
    log("Loading existing LoRA adapter (will continue training the same adapter)...")
    model = PeftModel.from_pretrained(model, prev_checkpoint, is_trainable=True)
    log("✓ Loaded previous adapter - continuing training on the same adapter")
    return model


def expected_lora_param_count(model, lora: LoraSettings) -> int:
    """r x (in + out) for every module the config targets, from the model's own module shapes."""
    targets = set(lora.target_modules)
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += lora.r * (module.in_features + module.out_features)
    return total


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
    count, expected = sum(trainable.values()), expected_lora_param_count(model, lora)
    if count != expected:
        raise CurriculumError(f"{count:,} trainable parameters, but the LoRA config on this model's shapes "
                              f"implies {expected:,}: the adapter is frozen or duplicated")
    return count


# ---------------------------------------------------------------------------------------------------------------------
# Lineage and optimizer moments: what a later stage and the verifier check
# ---------------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")  # a dataset folder's data, beside its images


def split_sha256(path: str | os.PathLike) -> str:
    """A split's SHA-256: of the file, or, for a dataset folder, of its table files by relative path (not its
    image files: as for JSONL, images are checked, not hashed)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TABLE_SUFFIXES):
        h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()


def previous_stage_dir(stage_dir: str | os.PathLike, recorded: str | None) -> Path | None:
    """Where the stage that `stage_dir` continued is now: the path it recorded, or else, for a curriculum moved as
    a whole, the folder of that name beside `stage_dir`. None when neither holds an adapter. (Whether it is the
    right adapter is for its SHA-256 to say.)"""
    if not recorded:
        return None
    for candidate in (Path(recorded), Path(stage_dir).parent / Path(recorded).name):
        if (candidate / ADAPTER_WEIGHTS).is_file():
            return candidate
    return None


def adapter_tensors_sha256(tensors: dict) -> str:
    """A hash of adapter weights by name and float32 value: equal for a file and the model it was loaded into."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def loaded_adapter_sha256(model) -> str:
    from peft import get_peft_model_state_dict

    return adapter_tensors_sha256(get_peft_model_state_dict(model))


def check_loaded_adapter_matches(model, prev_checkpoint: str) -> str:
    """The LoRA weights now in the model are exactly those the previous stage saved; returns their hash."""
    loaded = loaded_adapter_sha256(model)
    if loaded != file_adapter_sha256(prev_checkpoint):
        raise CurriculumError(f"the adapter weights in memory differ from {prev_checkpoint}/{ADAPTER_WEIGHTS}: "
                              "this is not the adapter the previous stage saved")
    return loaded


def read_adapter_file(adapter_dir: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def file_adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    return adapter_tensors_sha256(read_adapter_file(adapter_dir))


def check_adapter_on_every_process(model, cfg: StageConfig) -> list[dict]:
    """Before the first step, every process proves that it holds the adapter to train (only LoRA trains, in the
    expected count; at stage >= 2 the weights are the previous stage's), then all compare what they hold: one
    stale copy of prev_checkpoint on one machine stops the run on every process, not just on that one. Returns
    one view per process: {process, trainable_params, start_tensors_sha256}."""
    view = {"process": processes().process_index, "error": None}
    try:
        view["trainable_params"] = check_adapter_trainable(model, cfg.lora)
        view["start_tensors_sha256"] = (check_loaded_adapter_matches(model, cfg.prev_checkpoint)
                                        if cfg.prev_checkpoint else loaded_adapter_sha256(model))
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
    return [{k: v for k, v in view.items() if k != "error"} for view in views]


def check_trained_adapter_on_every_process(model, start_views: list[dict]) -> list[dict]:
    """After training, every process hashes the adapter it holds; they must agree (DDP keeps one copy per process
    in step). Under FSDP each process holds a shard of the one copy, so there is nothing to compare (None)."""
    final = None if fsdp_enabled() else loaded_adapter_sha256(model)
    ends = gather_from_processes(final)
    views = [dict(v, final_tensors_sha256=end) for v, end in zip(start_views, ends, strict=True)]
    check_processes_agree(views, "final_tensors_sha256", "weights after the last step",
                          "They trained apart instead of as one (the model was not wrapped in DDP); nothing was saved")
    return views


def processes_ended_apart_from(views: list[dict], saved_tensors_sha: str) -> bool:
    """Whether a process ended training with an adapter other than the saved one (None, under FSDP: not hashed)."""
    ends = {v.get("final_tensors_sha256") for v in views} - {None}
    return bool(ends) and ends != {saved_tensors_sha}


def unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


def save_optimizer_moments(model, optimizer, path: Path) -> None:
    """AdamW's moments per LoRA parameter, by parameter name, in safetensors (no pickle)."""
    from safetensors.torch import save_file

    state = unwrap_optimizer(optimizer).state
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in state.get(param, {}).items():
            tensors[f"{name}::{key}"] = value.detach().to("cpu").reshape(value.shape).contiguous()
    save_file(tensors, str(path))


def load_optimizer_moments(model, optimizer, path: Path) -> int:
    """Put the previous stage's moments into a fresh optimizer; the schedule and step counter stay new."""
    from safetensors.torch import load_file

    saved, opt = load_file(str(path)), unwrap_optimizer(optimizer)
    loaded = 0
    for name, param in model.named_parameters():
        keys = {k.split("::", 1)[1]: v for k, v in saved.items() if k.split("::", 1)[0] == name}
        if param.requires_grad and keys:
            opt.state[param] = {k: (v if k == "step" else v.to(param.device)) for k, v in keys.items()}
            loaded += 1
    if loaded != sum(p.requires_grad for p in model.parameters()):
        raise CurriculumError(f"{path}: moments for {loaded} of the trainable parameters; names do not match")
    return loaded


# ---------------------------------------------------------------------------------------------------------------------
# Train, evaluate, save
# ---------------------------------------------------------------------------------------------------------------------


def planned_steps(n_train: int, cfg: StageConfig, num_processes: int) -> int:
    """Optimizer steps of the stage. An epoch is ceil(n / (batch_size x processes)) batches on each process (the
    last one filled up from the start), and a last, shorter accumulation still makes a step, as in the Trainer."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (cfg.batch_size * num_processes)) / cfg.grad_accum)
    return math.ceil(per_epoch * cfg.epochs)


def make_log_callbacks():
    """One fixed-format, greppable line per logging interval: `step N/M | loss | lr | dt | mem`."""
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.t_last, self.step_last = time.time(), 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now = time.time()
            dt = (now - self.t_last) / max(state.global_step - self.step_last, 1)
            self.t_last, self.step_last = now, state.global_step
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else "cpu"
            tqdm.write(f"step {state.global_step}/{state.max_steps} | loss {logs['loss']:.4f} | "
                  f"lr {logs.get('learning_rate', 0):.2e} | dt {dt:.2f}s/step | mem {mem}")

    class ProgressBarOnly(ProgressCallback):
        """The Trainer's progress bar, without its dict of numbers at every log (StepLog prints those)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return StepLog(), ProgressBarOnly()


def answer_positions(labels):
    """Positions whose *next* token is trained (a causal LM predicts token t+1 at position t), as one index set
    for the whole batch (the union over rows, which any transformers version's `logits_to_keep` accepts), and the
    target of each row at each of them (-100 where that row trains nothing there)."""
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return keep, targets[:, keep]


def answer_loss(logits, targets, num_items_in_batch=None):
    """Cross-entropy in fp32 over the trained positions: a mean over them, or a sum divided by the token count of
    the whole accumulated batch when the Trainer gives one, exactly as transformers' causal-LM loss does."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    return loss / (count.to(loss.device) if hasattr(count, "to") else count)


def answer_only_loss(model, inputs: dict, num_items_in_batch=None):
    """The model's forward with logits only at the answer positions (a few per sample instead of every one, of
    151,936 each); the same loss as the model's own. Returns (loss, outputs). Goes through the model's (or the
    DDP wrapper's) own forward, so gradient synchronisation and hooks behave as usual."""
    inputs = dict(inputs)
    keep, targets = answer_positions(inputs.pop("labels"))
    outputs = model(**inputs, logits_to_keep=keep)
    return answer_loss(outputs.logits, targets, num_items_in_batch), outputs


def auto_batch_size(model, dataset, processor, cfg: StageConfig) -> int:
    """batch_size: auto (curriculum/batch_size.py), measured on the batches and the loss the Trainer trains with
    (build_trainer)."""
    pad_id = processor.tokenizer.pad_token_id

    def step_loss(model, batch: dict):
        return answer_only_loss(model, batch)[0] if cfg.answer_only_logits else model(**batch).loss

    return choose_batch_size(model, dataset, cfg, lambda examples: collate_batch(examples, pad_id), step_loss)


def one_gpu_per_process(args, world: int) -> None:
    """One process sees several GPUs (a plain `python train_qlora_qwen3vl.py` on a machine with two): the Trainer
    would wrap the model in nn.DataParallel, which copies the whole 4-bit model to every GPU at every step, runs
    slower than one GPU and reports half the batch it trains. Train on this process's GPU; `accelerate launch`
    (configs/accelerate/ddp.yaml) is the way to use them all. The Trainer reads the count from `args._n_gpu`."""
    if world > 1 or args.n_gpu <= 1:
        return
    if not hasattr(args, "_n_gpu"):
        raise ConfigError(f"{args.n_gpu} GPUs are visible to one process and this transformers version would train "
                          "on them with nn.DataParallel; set CUDA_VISIBLE_DEVICES to one GPU, or use accelerate launch "
                          "--config_file configs/accelerate/ddp.yaml")
    log(f"{args.n_gpu} GPUs visible to one process: training on GPU {training_device()} only (not nn.DataParallel); to "
        "train on all of them: accelerate launch --config_file configs/accelerate/ddp.yaml train_qlora_qwen3vl.py ...")
    args._n_gpu = 1


def build_trainer(model, processor, train_ds, eval_ds, cfg: StageConfig, work_dir: Path):
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    class AnswerOnlyLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = answer_only_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: the count spans processes
            return (loss, outputs) if return_outputs else loss

    world = processes().num_processes
    total = planned_steps(len(train_ds), cfg, world)
    log(f"Effective batch size {cfg.batch_size * world * cfg.grad_accum} = {cfg.batch_size} per process x {world} "
        f"process(es) x {cfg.grad_accum} accumulation step(s); {total} optimizer steps planned")
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
    pad_id = processor.tokenizer.pad_token_id
    trainer_class = AnswerOnlyLossTrainer if cfg.answer_only_logits else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=lambda examples: collate_batch(examples, pad_id), processing_class=processor)
    trainer.remove_callback(ProgressCallback)
    for callback in make_log_callbacks():
        trainer.add_callback(callback)
    # one folder per stage, side by side (`tensorboard --logdir <curriculum>/tensorboard`), written by one process
    if cfg.tensorboard and is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        out = Path(cfg.output_dir)
        trainer.add_callback(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out.parent / "tensorboard"
                                                                                  / out.name))))
    return trainer


def before_first_step(measure):
    """A callback that runs `measure()` once training begins: after the Trainer has wrapped the model for
    training, before the first step. Evaluating before `trainer.train()` instead makes accelerate mark the model
    as prepared (for evaluation, without DDP), and train() then skips the DDP wrap: every process silently trains
    its own copy on its own shard of the data (accelerate 1.15; check_trained_adapter_on_every_process caught it)."""
    from transformers import TrainerCallback

    class BeforeFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            measure()

    return BeforeFirstStep()


def eval_loss(trainer, dataset, prefix: str) -> float | None:
    if dataset is None:
        return None
    return trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)[f"{prefix}_loss"]


def previous_stage_metrics(prev_checkpoint: str | None) -> dict | None:
    if not prev_checkpoint or not (Path(prev_checkpoint) / STAGE_METRICS).is_file():
        return None
    return json.loads((Path(prev_checkpoint) / STAGE_METRICS).read_text())


def save_adapter_under_fsdp(trainer, model, processor, staging: Path) -> None:
    """The adapter of an FSDP run, in peft's own file layout. accelerate gathers the full state dict (every process
    takes part; the main one receives it), but peft's filter finds none of its LoRA weights under the names of a
    model FSDP has wrapped, and the Trainer then writes an empty adapter (peft 0.21, accelerate 1.15)."""
    import copy

    from safetensors.torch import save_file

    full = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return
    staging.mkdir(parents=True, exist_ok=True)
    tensors = {name.replace(".default.", "."): value.detach().to("cpu").contiguous()
               for name, value in full.items() if "lora_" in name and ".default." in name}
    save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True  # as peft's save_pretrained writes it
    config.save_pretrained(str(staging))
    processor.save_pretrained(str(staging))


def check_saved_adapter(saved_tensors: dict, trainable: int, staging: Path) -> None:
    """The file written holds exactly the LoRA parameters that trained: an empty or partial adapter (what the
    Trainer writes under FSDP through peft's filter) never passes for a stage."""
    saved = sum(t.numel() for t in saved_tensors.values())
    if saved != trainable:
        raise CurriculumError(f"the adapter written to {staging} holds {saved:,} LoRA parameters, but {trainable:,} "
                              "were trained; nothing was saved as the stage")


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def model_card(cfg: StageConfig, metrics: dict, accuracy_table: str | None) -> str:
    """The stage folder's README.md, in place of peft's empty template: the base, the stage and its lineage, the
    data by SHA-256, the losses and the dev accuracy by question type."""
    lora, q = cfg.lora, cfg.quantization
    front = ["---", f"base_model: {cfg.model_name_or_path}", "library_name: peft", "pipeline_tag: image-text-to-text",
             "tags:", f"- base_model:adapter:{cfg.model_name_or_path}", "- lora", "- qlora", "- qwen3-vl",
             "- curriculum", "---", ""]
    if metrics.get("prev_checkpoint"):
        lineage = [f"Continues the adapter saved by the previous stage in `{cfg.prev_checkpoint}` (recorded as "
                   f"`{metrics['prev_checkpoint']}`), reopened for training: the same LoRA weights, trained further.",
                   "", f"- started from: adapter file sha256 `{metrics.get('start_adapter_file_sha256')}`, tensors "
                   f"sha256 `{metrics.get('start_adapter_tensors_sha256')}`"]
    else:
        lineage = ["A new adapter (B = 0 at the start, so it began as the base model).", ""]
    lineage.append(f"- saved: adapter file sha256 `{metrics.get('saved_adapter_file_sha256')}`, tensors sha256 "
                   f"`{metrics.get('saved_adapter_tensors_sha256')}`")
    data = ["| split | file | SHA-256 |", "|---|---|---|"] + [f"| {key} | `{entry['path']}` | `{entry['sha256']}` |"
                                                            for key, entry in (metrics.get("data_files") or {}).items()]
    continued = [f"| first_eval_loss, before the first step, on the dev split the previous stage ended on | "
                 f"{_loss(metrics.get('first_eval_loss'))} |",
                 f"| previous stage's final_eval_loss there | {_loss(metrics.get('previous_final_eval_loss'))} |"]
    losses = ["| loss | value |", "|---|---|", *(continued if metrics.get("prev_checkpoint") else []),
              f"| before the first step, on `{cfg.eval_file}` | {_loss(metrics.get('first_eval_loss_own_split'))} |",
              f"| final_eval_loss (on `{cfg.eval_file}`) | {_loss(metrics.get('final_eval_loss'))} |",
              f"| train_loss, the mean over the stage | {_loss(metrics.get('train_loss'))} |"]
    n = (metrics.get("dev_metrics") or {}).get("overall", {}).get("n")
    accuracy = [f"Greedy answers to {n} questions of `{cfg.eval_file}`, parsed and scored as vqa_eval.py does:", "",
                accuracy_table] if accuracy_table else ["Not measured (no eval_file, or eval_questions: 0)."]
    return "\n".join(front + [
        f"# Stage {cfg.stage}: a LoRA adapter for `{cfg.model_name_or_path}`", "",
        f"Stage {cfg.stage} of a curriculum, trained by `train_qlora_qwen3vl.py` with QLoRA: the base frozen in "
        f"4-bit {q.quant_type} (compute {q.compute_dtype}, double quant {q.double_quant}), one LoRA adapter "
        f"(r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, on {', '.join(lora.target_modules)}) trained "
        f"for {metrics.get('global_steps')} optimizer steps at effective batch {metrics.get('effective_batch_size')}, "
        f"lr {cfg.lr:g}. Every setting is in `{RESOLVED_CONFIG}`; every number below is in `{STAGE_METRICS}`.", "",
        "## Base model", "", f"`{cfg.model_name_or_path}`, as the config names it (`{ADAPTER_CONFIG}` records the "
        "same), so the folder names its base wherever it is moved.", "",
        "## Lineage", "", *lineage, "",
        "## Data", "", f"{metrics.get('train_samples')} training samples.", "", *data, "",
        "## Losses", "", *losses, "",
        "## Dev accuracy by question type", "", *accuracy, "",
        *forgetting.card_lines(metrics),
        "## Use", "", "```",
        "python verify_exp4_fix.py THIS_FOLDER                                 # prove the lineage, reopen it",
        "python train_qlora_qwen3vl.py NEXT_STAGE.yaml --set prev_checkpoint=THIS_FOLDER   # continue it",
        "python export_merged.py THIS_FOLDER MERGED_FOLDER --check 20           # a merged bf16 model to serve",
        "```", ""])


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
        save_adapter_under_fsdp(trainer, model, processor, staging)
    else:
        trainer.save_model(str(staging))  # adapter_config.json + adapter_model.safetensors + processor files
    if not trainer.is_world_process_zero():
        return out
    (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle; resolved_config.yaml says it all
    saved_tensors = read_adapter_file(staging)  # read once: counted here, hashed below
    check_saved_adapter(saved_tensors, metrics["trainable_params"], staging)
    if fsdp_enabled():  # sharded moments are not per-parameter tensors; validate_config refuses resume under FSDP
        log("Optimizer moments are not saved under FSDP (a later stage uses optimizer_state: fresh)")
    else:
        save_optimizer_moments(model, trainer.optimizer, staging / OPTIMIZER_MOMENTS)
    metrics["saved_adapter_file_sha256"] = sha256_file(staging / ADAPTER_WEIGHTS)
    metrics["saved_adapter_tensors_sha256"] = adapter_tensors_sha256(saved_tensors)
    if processes_ended_apart_from(metrics["processes"], metrics["saved_adapter_tensors_sha256"]):
        raise CurriculumError(f"the adapter written to {staging} differs from the one the processes trained")
    (staging / RESOLVED_CONFIG).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (staging / STAGE_METRICS).write_text(json.dumps(metrics, indent=2))
    import vqa_eval  # evaluation and plots live beside the trainer

    accuracy = vqa_eval.metrics_table(metrics["dev_metrics"]) if metrics.get("dev_metrics") else None
    (staging / "README.md").write_text(model_card(cfg, metrics, accuracy))  # in place of peft's empty template
    if predictions is not None:
        vqa_eval.write_predictions(predictions, staging / "predictions_dev.jsonl")
    for plot in vqa_eval.write_stage_plots(staging):
        log(f"Plot: {out / plot.name}")
    if out.exists():  # only reachable with overwrite: true (validate_config refuses otherwise)
        replaced = Path(f"{out}.replaced")  # the old stage is moved aside, not deleted, until the new one is in
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(out, replaced)
        os.replace(staging, out)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, out)
    return out


def train_stage(cfg: StageConfig) -> dict:
    """Load, prove the adapter is the one to train, measure, train, measure, save. Returns stage_metrics."""
    import torch
    from transformers import set_seed

    set_seed(cfg.seed)
    model_path = resolve_model_path(cfg.model_name_or_path)
    processor = load_processor(model_path, cfg)
    train_ds = load_split(cfg.train_file, processor, cfg, "train")
    eval_ds = load_split(cfg.eval_file, processor, cfg, "eval") if cfg.eval_file else None
    prev_metrics = previous_stage_metrics(cfg.prev_checkpoint)
    # Earlier stages (curriculum/forgetting.py): their training records replayed, their dev splits watched
    earlier = forgetting.lineage(cfg.prev_checkpoint, previous_stage_metrics, previous_stage_dir)
    replay = forgetting.mix_replay(train_ds, cfg, earlier, lambda path, name: load_split(path, processor, cfg, name),
                                   split_sha256)
    earlier_splits = (forgetting.earlier_dev_splits(earlier, lambda path, name: load_split(path, processor, cfg, name))
                      if cfg.watch_earlier_stages else {})
    # what the stage trained and was measured on, by content (for the model card); one process hashes them
    data_files = ({key: {"path": getattr(cfg, key), "sha256": split_sha256(getattr(cfg, key))}
                   for key in ("train_file", "eval_file", "test_file") if getattr(cfg, key)}
                  if is_main_process() else None)
    # first_eval_loss is measured on the split the previous stage ended on, so the two numbers compare.
    prev_eval_file = (prev_metrics or {}).get("final_eval_file")
    if cfg.prev_checkpoint and prev_eval_file and Path(prev_eval_file).exists():  # a file, or a dataset folder
        continuity_ds = load_split(prev_eval_file, processor, cfg, "previous stage's eval")
    else:
        continuity_ds = eval_ds
        if cfg.prev_checkpoint:
            log(f"WARNING: {cfg.prev_checkpoint} records no eval split; first_eval_loss uses this stage's own")

    work_dir = Path(f"{cfg.output_dir}.partial")  # intermediate checkpoints; removed once the stage is saved
    with processes().main_process_first():  # the main process tidies work_dir; the others then read the same
        # before the long model load: a mismatch is reported at once
        resume_from = interrupted_run(work_dir, config_to_dict(cfg))

    model = load_quantized_base(model_path, cfg)
    if cfg.prev_checkpoint:
        model = continue_adapter(model, cfg.prev_checkpoint)
    else:
        model = new_adapter(model, cfg.lora, cfg.seed)
    patches = speed.apply_speed_patches(model, cfg, speed.plan_speed_patches(cfg, fsdp_enabled())[0], log)
    process_views = check_adapter_on_every_process(model, cfg)
    trainable = process_views[0]["trainable_params"]
    start_file_sha = sha256_file(Path(cfg.prev_checkpoint) / ADAPTER_WEIGHTS) if cfg.prev_checkpoint else None
    start_tensor_sha = process_views[0]["start_tensors_sha256"] if cfg.prev_checkpoint else None
    if cfg.prev_checkpoint:
        log("✓ Adapter is trainable and ready for continued training")
    if is_main_process():
        model.print_trainable_parameters()
    log(f"Trainable parameters: {trainable:,} (LoRA only; equals r x (in + out) over the targeted modules)")
    if len(process_views) > 1:
        log(f"✓ All {len(process_views)} processes hold the same adapter (tensors sha256 "
            f"{process_views[0]['start_tensors_sha256'][:16]}...), trainable, {trainable:,} parameters each")

    # what the interrupted run measured before its first step and the batch it chose, kept for the resumed run
    resumed = json.loads((work_dir / STAGE_START).read_text()) if resume_from else None
    # cfg itself stays as written (resume compares it); run_cfg holds what auto resolved to
    run_cfg = dataclasses.replace(cfg, answer_only_logits=patches["answer_only_logits"].on)
    batch_size = cfg.batch_size
    if batch_size == "auto" and resumed:  # a resumed run keeps the batch it was started with
        batch_size = resumed["batch_size_chosen"]
    elif batch_size == "auto":
        batch_size = auto_batch_size(model, train_ds, processor, run_cfg)
    run_cfg = dataclasses.replace(run_cfg, batch_size=batch_size)

    trainer = build_trainer(model, processor, train_ds, eval_ds, run_cfg, work_dir)
    guard = StageGuard(model)
    trainer.add_callback(guard.callback())
    watch = forgetting.EarlierStagesWatch(
        earlier_splits, cfg, work_dir, resumed=bool(resume_from),
        evaluate=lambda datasets, prefix: trainer.evaluate(eval_dataset=datasets, metric_key_prefix=prefix))
    if earlier_splits:
        trainer.add_callback(watch.callback())
    if cfg.optimizer_state == "resume" and not resume_from:  # a resumed run restores its own optimizer
        trainer.create_optimizer()
        n = load_optimizer_moments(model, trainer.optimizer, Path(cfg.prev_checkpoint) / OPTIMIZER_MOMENTS)
        log(f"Resumed AdamW moments for {n} LoRA tensors from {cfg.prev_checkpoint} (schedule starts anew)")

    start = {"t0": time.time(), "batch_size_chosen": batch_size}

    def measure_start() -> None:
        """The losses before the first step (continuity with the previous stage), saved for a resumed run."""
        start["first_eval_loss"] = eval_loss(trainer, continuity_ds, "first_eval")
        start["first_eval_loss_own_split"] = (eval_loss(trainer, eval_ds, "first_own_eval")
                                              if continuity_ds is not eval_ds else start["first_eval_loss"])
        log(f"first_eval_loss {start['first_eval_loss']} (before the first step; previous stage ended at "
            f"{(prev_metrics or {}).get('final_eval_loss')})")
        if cfg.prev_checkpoint:
            log(f"Stage {cfg.stage}: starting from the adapter saved by stage "
                f"{(prev_metrics or {}).get('stage', '?')}")
        if trainer.is_world_process_zero():
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / STAGE_START).write_text(json.dumps({"config": config_to_dict(cfg), **start}))
        start["t0"] = time.time()  # train_seconds counts training only

    if resumed:
        start = resumed | {"t0": time.time()}
        log(f"Resuming stage {cfg.stage} from {resume_from}: the step, optimizer, scheduler, RNG and data order "
            "are restored")
    else:
        trainer.add_callback(before_first_step(measure_start))
    resumed_at = int(Path(resume_from).name.rsplit("-", 1)[1]) if resume_from else 0  # checkpoint-<step>
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as err:
        if is_disk_full(err, work_dir):
            raise disk_full_error(f"a checkpoint in {work_dir}", work_dir, cfg, STAGE_METRICS) from err
        raise
    train_seconds = time.time() - start["t0"]
    first_eval, first_own = start["first_eval_loss"], start["first_eval_loss_own_split"]
    if guard.non_finite_step is not None:
        done = complete_checkpoints(work_dir)
        last = done[-1] if done else None
        raise CurriculumError(
            f"the LoRA weights became non-finite (NaN/inf) at step {guard.non_finite_step}: the loss diverged. "
            f"Nothing was saved as the stage. Lower lr (now {cfg.lr:g}) or max_grad_norm; "
            + (f"the last good checkpoint is {last} (the same command resumes from it)." if last
               else "no earlier checkpoint exists (set save_steps to keep some)."))
    stop_signal = guard.stop_signal or guard.signal_name  # or one that came after the last step
    if stop_signal:
        code = 130 if stop_signal == "SIGINT" else 143
        raise StageStopped(f"stopped by {stop_signal} at step {trainer.state.global_step}/"
                           f"{trainer.state.max_steps}; checkpoint saved in {work_dir}. Run the same command to "
                           "resume.", code)
    watch.end(trainer.state, work_dir)  # the earlier stages' losses at the end; raises if forgetting stopped the stage
    final_eval = eval_loss(trainer, eval_ds, "final_eval")
    log(f"final_eval_loss {final_eval}")
    process_views = check_trained_adapter_on_every_process(model, process_views)
    dev_metrics = predictions = None
    if eval_ds is not None and cfg.eval_questions and fsdp_enabled():
        log("Dev accuracy by generation is skipped under FSDP (the model is sharded across processes); measure it on "
            f"one GPU: python vqa_eval.py {cfg.output_dir}/{RESOLVED_CONFIG}")
    elif eval_ds is not None and cfg.eval_questions:
        import vqa_eval

        records = eval_ds.records if cfg.eval_questions < 0 else eval_ds.records[:cfg.eval_questions]
        dev_metrics, predictions = vqa_eval.evaluate_records(model, processor, records, cfg)
        log(f"Dev accuracy after stage {cfg.stage} ({len(records)} questions, by generation"
            f"{f' on {len(process_views)} processes' if len(process_views) > 1 else ''}):\n"
            + vqa_eval.metrics_table(dev_metrics))
    if earlier_splits and cfg.eval_questions and not fsdp_enabled():  # the earlier stages' dev splits, answered
        import vqa_eval

        watch.answer(lambda records: vqa_eval.evaluate_records(model, processor, records, cfg)[0], cfg.eval_questions)

    world = len(process_views)
    metrics = {
        "stage": cfg.stage,
        "model_name_or_path": cfg.model_name_or_path,
        "prev_checkpoint": str(Path(cfg.prev_checkpoint).resolve()) if cfg.prev_checkpoint else None,
        "trainable_params": trainable,
        "lora": dataclasses.asdict(cfg.lora),
        "quantization": dataclasses.asdict(cfg.quantization),
        "first_eval_loss": first_eval,
        "first_eval_file": str(Path(prev_eval_file if continuity_ds is not eval_ds else cfg.eval_file).resolve())
        if continuity_ds is not None else None,
        "first_eval_loss_own_split": first_own,
        "previous_final_eval_loss": (prev_metrics or {}).get("final_eval_loss"),
        "final_eval_loss": final_eval,
        "final_eval_file": str(Path(cfg.eval_file).resolve()) if cfg.eval_file else None,
        "data_files": data_files,
        "dev_metrics": dev_metrics,
        "earlier_stages": watch.records(trainer.state.log_history),  # their dev splits, watched (forgetting.py)
        "forgetting": watch.summary(),
        "replay": replay,  # earlier stages' training records mixed in: which, how many, their files' SHA-256
        "train_loss_history": [{"step": e["step"], "loss": e["loss"]}
                               for e in trainer.state.log_history if "loss" in e],
        "eval_loss_history": [{"step": e["step"], "loss": e["eval_loss"]}
                              for e in trainer.state.log_history if "eval_loss" in e],
        "train_loss": result.training_loss,
        "global_steps": trainer.state.global_step,
        "batch_size_chosen": batch_size if cfg.batch_size == "auto" else None,
        "effective_batch_size": batch_size * cfg.grad_accum * world,
        "num_processes": world,
        "train_samples": len(train_ds),
        "train_seconds": round(train_seconds, 2),
        # steps of this run only: a resumed run timed only what it trained after the resume
        "samples_per_second": round((trainer.state.global_step - resumed_at) * batch_size * cfg.grad_accum
                                    * world / max(train_seconds, 1e-9), 3),
        "resumed_from_step": resumed_at or None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available()
        else None,
        "start_adapter_file_sha256": start_file_sha,
        "start_adapter_tensors_sha256": start_tensor_sha,
        "optimizer_state": cfg.optimizer_state,
        "speed_patches": speed.describe_speed_patches(patches),
        "versions": speed.versions("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel"),
        "bad_records_skipped": {"train": train_ds.bad_records, "eval": eval_ds.bad_records if eval_ds else []},
        "processes": process_views,  # what each process held before the first step and after the last
        "distributed": "fsdp" if fsdp_enabled() else "ddp" if world > 1 else None,
    }
    staging = Path(f"{cfg.output_dir}.saving")
    try:
        out = save_stage(trainer, model, processor, cfg, metrics, predictions, staging)
    except Exception as err:
        if is_disk_full(err, staging):
            raise disk_full_error(f"the stage to {staging}", work_dir, cfg, STAGE_METRICS) from err
        raise
    if trainer.is_world_process_zero():
        shutil.rmtree(work_dir, ignore_errors=True)
        log(f"Saved stage {cfg.stage} to {out} (adapter sha256 {metrics['saved_adapter_file_sha256'][:16]}...)")
    return metrics


def check_data(cfg: StageConfig) -> None:
    """`--check`: validate config and every split (records, images, lengths) without loading the model."""
    processor = load_processor(resolve_model_path(cfg.model_name_or_path), cfg)
    for split, path in (("train", cfg.train_file), ("eval", cfg.eval_file)):
        if path:
            load_split(path, processor, cfg, split)
    log("Check passed: config and data are valid (no model loaded, nothing trained)")


def parse_args(argv: list[str]) -> tuple[str, list[str], bool]:
    """`CONFIG.yaml [--set key=value ...] [--check]`; any other flag is an error."""
    config, overrides, check, i = None, [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--set" and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            i += 1
        elif arg.startswith("--set="):
            overrides.append(arg[len("--set="):])
        elif arg == "--check":
            check = True
        elif arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif arg.startswith("-") or config is not None:
            raise ConfigError(f"unexpected argument {arg!r}; usage: train_qlora_qwen3vl.py CONFIG.yaml "
                              "[--set key=value ...] [--check]")
        else:
            config = arg
        i += 1
    if config is None:
        raise ConfigError("usage: train_qlora_qwen3vl.py CONFIG.yaml [--set key=value ...] [--check]")
    return config, overrides, check


def main(argv: list[str] | None = None) -> int:
    try:
        config_path, overrides, check = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(config_path, overrides)
        validate_config(cfg, training=not check)
        log("Resolved config:\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        log(runtime())
        if check:
            check_data(cfg)
        else:
            train_stage(cfg)
    # These reach every process alike (the checks compare across processes), so the main process says them once.
    except ConfigError as err:
        log(f"error: {err}", file=sys.stderr)
        return 2
    except CurriculumError as err:
        log(f"error: {err}", file=sys.stderr)
        return 1
    except DiskFull as err:
        log(f"error: {err}", file=sys.stderr)
        return 4
    except StageStopped as stop:
        log(f"Stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            where = f"process {runtime().rank}: " if runtime().world_size > 1 else ""  # one GPU can run out alone
            print(f"error: {where}out of GPU memory. Lower memory_budget_gib (with batch_size: auto) or batch_size "
                  "(and raise grad_accum to keep the effective batch), lower max_pixels (fewer image tokens), set "
                  "gradient_checkpointing: true, or lower "
                  f"eval_batch_size if it happened during evaluation.\n({str(err).splitlines()[0]})", file=sys.stderr)
            return 3
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
