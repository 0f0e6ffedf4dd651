"""The LoRA adapter on disk and in memory: its files, what they claim and hold (settings, tensor shapes), hashes that
tie a stage to the one before it, the optimizer moments a later stage may carry over, and the save under FSDP.

torch, peft and safetensors.torch are imported inside the functions that need them: reading a header or a JSON file
(validate_config, the verifier's cheap checks) must not wait seconds for them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

from safetensors import safe_open

from curriculum.config import LoraSettings
from curriculum.errors import CurriculumError
from curriculum.processes import check_processes_agree, fsdp_enabled, gather_from_processes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_MOMENTS = "optimizer_moments.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# What the files claim and hold, read without loading a model
# ---------------------------------------------------------------------------------------------------------------------


def read_adapter_lora(adapter_dir: str | os.PathLike) -> dict:
    """The LoRA settings that a saved adapter was trained with, in the config's names."""
    saved = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    targets = saved.get("target_modules")
    return {"r": saved.get("r"), "alpha": saved.get("lora_alpha"), "dropout": saved.get("lora_dropout"),
            "target_modules": sorted(targets) if isinstance(targets, list) else targets}


def lora_mismatches(expected: LoraSettings, saved: dict) -> list[str]:
    """Differences between the YAML's LoRA settings (`expected`, a LoraSettings) and a saved adapter's, one line
    each."""
    want = {"r": expected.r, "alpha": expected.alpha, "dropout": expected.dropout,
            "target_modules": sorted(expected.target_modules)}
    return [f"lora.{k}: the YAML says {want[k]!r}, the saved adapter has {saved[k]!r}"
            for k in want if want[k] != saved[k]]


def extra_adapters(adapter_dir: str | os.PathLike) -> list[str]:
    """Names of adapters saved beside `default`: peft writes each one into a sub-directory named after it."""
    return sorted(p.parent.name for p in Path(adapter_dir).glob(f"*/{ADAPTER_CONFIG}"))


def adapter_tensor_shapes(adapter_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Name -> shape of each tensor in the adapter's safetensors file, from the file's header (no weights read)."""
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="numpy") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}


def adapter_file_problems(adapter_dir: str | os.PathLike, expected: LoraSettings | None = None,
                          expected_source: str = "") -> list[str]:
    """Why the adapter saved in `adapter_dir` cannot load as the LoRA its adapter_config.json describes, one line
    each, none if it can. Reads the JSON and the tensor shapes, no weights and no model: a hand-edited config is
    named in a second, not as a size mismatch from deep inside the model load. With `expected` (the LoraSettings
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


def adapter_to_continue_problems(prev: Path, lora: LoraSettings, optimizer_state: str) -> list[str]:
    """What is wrong with the previous stage's folder as the adapter to continue (config keys named), before any
    model loads: no adapter, a damaged one (named by file rather than as a size mismatch inside the load), other
    LoRA settings than `lora`, a second adapter beside it, no moments to resume."""
    if not prev.is_dir():
        return [f"prev_checkpoint: directory not found: {prev}"]
    if not (prev / ADAPTER_CONFIG).is_file() or not (prev / ADAPTER_WEIGHTS).is_file():
        return [f"prev_checkpoint: {prev} holds no LoRA adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"]
    file_problems = adapter_file_problems(prev)
    problems = [f"prev_checkpoint: {prev}: {line}" for line in file_problems]
    if not file_problems:  # (an adapter_config.json that does not read has no settings to compare)
        problems += [f"prev_checkpoint: {line}" for line in lora_mismatches(lora, read_adapter_lora(prev))]
    nested = extra_adapters(prev)
    if nested:
        problems.append(f"prev_checkpoint: {prev} holds more than one adapter (also: {', '.join(nested)})")
    if optimizer_state == "resume" and not (prev / OPTIMIZER_MOMENTS).is_file():
        problems.append(f"optimizer_state: resume, but {prev} has no {OPTIMIZER_MOMENTS}")
    return problems


def expected_lora_param_count(model, lora: LoraSettings) -> int:
    """r x (in + out) for every module the config (`lora`, a LoraSettings) targets, from the model's own module
    shapes: the trainable count that exactly one adapter has."""
    targets = set(lora.target_modules)
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features") and hasattr(module, "out_features"):
            total += lora.r * (module.in_features + module.out_features)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Hashes: the lineage a later stage and the verifier check
# ---------------------------------------------------------------------------------------------------------------------


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

    # save_embedding_layers=False: see save_lora_only
    return adapter_tensors_sha256(get_peft_model_state_dict(model, save_embedding_layers=False))


def save_lora_only(model):
    """Every save of this peft model writes the LoRA tensors alone, the Trainer's checkpoints included.

    peft's default (`save_embedding_layers="auto"`) decides whether to save the embeddings too by looking the base up
    by its `base_model_name_or_path`, on the Hub when that is not a local folder (`tiny-qwen3vl`, or a hub id on a
    machine without access): it warns "Could not find a config file" or "Unable to fetch remote file" on every save.
    The embeddings never train here (only LoRA parameters do, check_adapter_trainable), so there is nothing to look
    up. The Trainer calls `model.save_pretrained(dir, state_dict=...)` and passes no such flag, hence the wrapper."""
    import functools

    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)
    return model


def read_adapter_file(adapter_dir: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))


def file_adapter_sha256(adapter_dir: str | os.PathLike) -> str:
    return adapter_tensors_sha256(read_adapter_file(adapter_dir))


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


# ---------------------------------------------------------------------------------------------------------------------
# Optimizer moments, and the adapter of an FSDP run
# ---------------------------------------------------------------------------------------------------------------------


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


def save_adapter_under_fsdp(trainer, model, processor, staging: Path) -> None:
    """The adapter of an FSDP run, in peft's own file layout. accelerate gathers the full state dict (every process
    takes part; the main one receives it), but peft's filter finds none of its LoRA weights under the names of a
    model FSDP has wrapped, and the Trainer then writes an empty adapter (peft 0.21, accelerate 1.15)."""
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
