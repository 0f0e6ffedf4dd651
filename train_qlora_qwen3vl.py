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
`main()` last. The helpers it calls live in curriculum/ (the config's types, reading data files, adapter files and
hashes, the lineage of earlier stages, what runs in a training step, evaluation, speed patches, faults, processes),
none of which imports this file back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

# torch, transformers and peft are imported inside the functions that use them, not here: `--help`, a config error
# and the scripts and tests that import this file for its config do not wait seconds for them.
from curriculum import adapter_files, config, faults, forgetting, recipe_check, speed, stage_folder, stage_record
from curriculum.adapter_files import ADAPTER_WEIGHTS, OPTIMIZER_MOMENTS
from curriculum.answer_loss import IGNORE_INDEX, answer_only_loss
from curriculum.base_model import (
    align_special_tokens,
    bnb_config,
    from_pretrained_checked,
    load_processor,
    quant_storage_dtype,
    resolve_model_path,
)
from curriculum.batch_size import choose_batch_size
from curriculum.config import LoraSettings, StageConfig, keys_set, load_config
from curriculum.data_files import check_split, split_file_problems, split_hashes
from curriculum.errors import ConfigError, CurriculumError, DiskFull, StageStopped, out_of_memory_message
from curriculum.evaluation import evaluate_dev_split, evaluate_records, write_predictions
from curriculum.faults import STAGE_START
from curriculum.hashing import sha256_file
from curriculum.lineage import Lineage, RecordedStage, prev_checkpoint_problems, resolve_lineage
from curriculum.plan import Plan, apply_plan, plan_step
from curriculum.plots import write_stage_plots
from curriculum.processes import (
    check_processes_agree,
    cpu_threads_wait_passively,
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
from curriculum.typed_yaml import parse_args

cpu_threads_wait_passively()  # before torch loads: OpenMP reads it then (curriculum/processes.py says why)
speed.quiet_optional_backend_warnings()  # before bitsandbytes and Liger import: their optional backends' warnings
# peft calls a transformers method that transformers 5 renamed; the warning is about peft, not about you.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)


# ---------------------------------------------------------------------------------------------------------------------
# Config: the typed dataclasses of curriculum/config.py, read from YAML (unknown keys rejected with the closest valid
# key); every problem found in one pass
# ---------------------------------------------------------------------------------------------------------------------


def validate_config(cfg: StageConfig, training: bool = True) -> dict[str, speed.PatchDecision]:
    """Every problem in one error, each line naming the key to change; runs before anything heavy loads. Each group
    of keys checks itself (curriculum/config.py); the checks that read files, the GPU or the installed libraries
    are the helpers' that know them. training=False (`--check`): what only training needs (a GPU for batch_size:
    auto) is a note, not a problem. Returns the speed patches' decisions, made here once for train_stage."""
    patch_decisions, patch_problems = speed.plan_speed_patches(cfg, fsdp_enabled())
    problems = [
        *config.size_problems(cfg),
        *config.schedule_problems(cfg),
        *config.effective_batch_problems(cfg, processes().num_processes),
        *config.batch_size_auto_problems(cfg, training),
        *config.checkpointing_problems(cfg),
        *cfg.quantization.problems(cfg.fp32_upcast),
        *config.fsdp_problems(cfg, fsdp_enabled()),  # what FSDP cannot do, when launched with it
        *cfg.lora.problems(),
        *config.evaluation_problems(cfg),
        *config.output_problems(cfg),
        *patch_problems,  # a patch set to true that cannot apply here
        *config.image_problems(cfg),
        *split_file_problems(cfg),  # the split files exist and are of a kind the trainer reads
        *cfg.columns.problems(),
        *prev_checkpoint_problems(cfg),  # the adapter to continue: there, whole, with the YAML's LoRA settings
        *config.forgetting_problems(cfg),
        *cfg.replay.problems(),
        # replay's stages are in the lineage and their files unchanged: reads the stage records, hashes the files
        *(forgetting.replay_source_problems(cfg.replay, cfg.stage, resolve_lineage(cfg.prev_checkpoint))
          if cfg.replay.on else []),
        *stage_folder.output_dir_problems(cfg),
    ]
    if problems:
        raise ConfigError("config problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return patch_decisions


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


@dataclass
class VQADataset:
    """Records encoded on demand (in the dataloader's workers), so images are decoded in parallel with training."""
    records: list[Record]
    processor: Any
    min_pixels: int
    max_pixels: int
    lengths: list[int] | None = None  # tokens per record, when load_split measured them
    bad_records: list[str] = field(default_factory=list)  # `file:line: problem` of those skipped (on_bad_record: skip)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return encode_example(self.processor, self.records[i], self.min_pixels, self.max_pixels)


def collate_batch(examples: list[dict], pad_token_id: int, positions=None, padding_mask: bool = True) -> dict:
    """Right-pad to the longest sample: ids with pad, labels with -100, masks with 0; concatenate image patches.
    `positions` (speed.MRopePositions, with positions_in_dataloader): the batch's M-RoPE position ids too.
    `padding_mask=False` (drop_padding_mask): no attention mask in the batch once the positions have read it; the
    padding is on the right, so causal attention alone keeps every real token from seeing it."""
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
    if not padding_mask:
        del batch["attention_mask"]
    return batch


def load_split(path: str, processor, cfg: StageConfig, split: str) -> VQADataset:
    """A split's records, each checked before training (curriculum/data_files.py: records parsed, every image decoded
    once, lengths measured; bad or over-long records an error or skipped as configured), encoded on demand."""
    records, lengths, skipped = check_split(path, processor, cfg, split)
    return VQADataset(records, processor, cfg.min_pixels, cfg.max_pixels, lengths, skipped)


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
    checkpointed, streamed = speed.apply_gradient_checkpointing(model, cfg)  # here, once; not by the Trainer
    print_main(f"Loaded 4-bit {cfg.quantization.quant_type} base {model_path} in {time.time() - t0:.1f}s "
               f"(double quant {cfg.quantization.double_quant}, compute {cfg.quantization.compute_dtype}, storage "
               f"{quant_storage_dtype(cfg.quantization)}, fp32 up-cast {cfg.fp32_upcast}, gradient checkpointing on "
               f"{checkpointed} decoder layers{f', {streamed} streamed to CPU memory' if streamed else ''})")
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


def prove_adapter(model, lora: LoraSettings, lineage: Lineage) -> list[dict]:
    """Before the first step, every process proves that it holds the adapter to train (only LoRA trains, in the
    expected count; at stage >= 2 the weights are the previous stage's), then all compare what they hold: one
    stale copy of prev_checkpoint on one machine stops the run on every process, not just on that one. Returns
    one view per process: {process, trainable_params, start_tensors_sha256}."""
    view = {"process": processes().process_index, "error": None}
    try:
        view["trainable_params"] = check_adapter_trainable(model, lora)
        view["start_tensors_sha256"] = (check_loaded_adapter_matches(model, lineage.prev_checkpoint)
                                        if lineage.continues else adapter_files.loaded_adapter_sha256(model))
    except CurriculumError as err:
        view["error"] = str(err)
    views = gather_from_processes(view)
    failed = [v for v in views if v["error"]]
    if failed:  # one process: its message as it is; several: each failing process named
        raise CurriculumError(failed[0]["error"] if len(views) == 1
                              else "\n".join(f"process {v['process']}: {v['error']}" for v in failed))
    hint = ("Every process must read the same prev_checkpoint; on several machines, put it on a shared disk"
            if lineage.continues else "A new adapter is drawn from `seed` on every process; they must all use one")
    check_processes_agree(views, "start_tensors_sha256", "weights before the first step", hint)
    check_processes_agree(views, "trainable_params", "trainable parameters", hint)
    trainable = views[0]["trainable_params"]
    if lineage.continues:
        print_main("✓ Adapter is trainable and ready for continued training")
    if is_main_process():
        model.print_trainable_parameters()
    print_main(f"Trainable parameters: {trainable:,} (LoRA only; equals r x (in + out) over the targeted modules)")
    if len(views) > 1:
        print_main(f"✓ All {len(views)} processes hold the same adapter (tensors sha256 "
                   f"{views[0]['start_tensors_sha256'][:16]}...), trainable, {trainable:,} parameters each")
    return [{k: v for k, v in view.items() if k != "error"} for view in views]


# ---------------------------------------------------------------------------------------------------------------------
# Train: the step's size, the Trainer and what runs in a step (curriculum/step.py lists it in order); fit, with its
# faults handled; measure; save
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSize:
    """Samples per forward pass and process (the micro-batch), and forward passes per optimizer step: the config's,
    batch_size: auto's choice, or effective_batch's plan (choose_step_size decides, once)."""
    batch_size: int
    grad_accum: int


def planned_steps(n_train: int, size: StepSize, cfg: StageConfig, num_processes: int) -> int:
    """Optimizer steps of the stage. An epoch is ceil(n / (batch_size x processes)) batches on each process (the
    last one filled up from the start), and a last, shorter accumulation still makes a step, as in the Trainer."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = math.ceil(math.ceil(n_train / (size.batch_size * num_processes)) / size.grad_accum)
    return math.ceil(per_epoch * cfg.epochs)


def trainer_collate(model, processor, patches: dict):
    """The Trainer's data_collator: collate_batch, with the M-RoPE positions and without the padding mask where
    those patches are on."""
    positions = speed.MRopePositions(model.config) if patches["positions_in_dataloader"].on else None
    return functools.partial(collate_batch, pad_token_id=processor.tokenizer.pad_token_id, positions=positions,
                             padding_mask=not patches["drop_padding_mask"].on)


def trainer_step_loss(answer_only_logits: bool):
    """The training loss of one batch as the Trainer computes it (without the accumulation's token count)."""

    def step_loss(model, batch: dict):
        return answer_only_loss(model, batch)[0] if answer_only_logits else model(**batch).loss

    return step_loss


def auto_batch_size(model, dataset, processor, cfg: StageConfig, patches: dict) -> int:
    """batch_size: auto (curriculum/batch_size.py), measured on the batches and the loss the Trainer trains with
    (build_trainer, with the speed patches' decisions `patches`)."""
    return choose_batch_size(model, dataset, cfg,
                             trainer_collate(model, processor, patches),
                             trainer_step_loss(patches["answer_only_logits"].on))


def plan_effective_batch(model, dataset, processor, cfg: StageConfig, patches: dict, measured: dict | None = None):
    """effective_batch (curriculum/plan.py), measured on the batches and the loss the Trainer trains with
    (build_trainer). Returns the plan, the model set to it, and the record of what was measured."""
    return plan_step(model, dataset, cfg, trainer_collate(model, processor, patches),
                     trainer_step_loss(patches["answer_only_logits"].on), measured)


def choose_step_size(model, processor, train_ds, cfg: StageConfig, patches: dict,
                     resumed: StageStart | None) -> tuple[StepSize, dict | None, dict]:
    """The step's size: with effective_batch the plan (measured, or the interrupted run's), the model set to it;
    with batch_size: auto the batch measured (or the interrupted run's); else the config's. Returns it, the plan's
    record (None without effective_batch) and the patches' decisions with the plan's offload."""
    if cfg.effective_batch:
        if resumed:  # a resumed run keeps the plan it was started with
            plan = {"chosen": resumed.plan["chosen"], "kept_from_the_interrupted_run": True}
            kept = Plan(**plan["chosen"])
            why = speed.streaming_problem(model) if kept.streamed else None
            if why:
                raise ConfigError(f"the interrupted run's plan streams {kept.streamed} decoder layers, and streaming "
                                  f"was checked and {why}; to train without streaming, move <output_dir>.partial "
                                  "aside and run the stage again with streamed_layers: 0")
            apply_plan(model, kept)
            print_main(f"Plan: {kept.describe()} (the interrupted run's)")
        else:
            plan = plan_effective_batch(model, train_ds, processor, cfg, patches)[1]
        chosen = Plan(**plan["chosen"])
        where = "pinned CPU memory" if gpu_available() else "a copy (a CPU run: nothing to save)"
        patches = patches | {"offload_activations": speed.PatchDecision(
            chosen.offload, f"on, by the plan ({chosen.checkpointed} checkpointed decoder layers keep their inputs "
            f"in {where})" if chosen.offload else "off, by the plan")}
        return StepSize(chosen.micro_batch, chosen.grad_accum), plan, patches
    if cfg.batch_size == "auto":  # a resumed run keeps the batch it was started with
        batch = resumed.batch_size_chosen if resumed else auto_batch_size(model, train_ds, processor, cfg, patches)
        return StepSize(batch, cfg.grad_accum), None, patches
    return StepSize(cfg.batch_size, cfg.grad_accum), None, patches


def build_trainer(model, processor, train_ds, eval_ds, cfg: StageConfig, size: StepSize, patches: dict,
                  work_dir: Path, guard: faults.StageGuard | None = None,
                  watch: forgetting.EarlierStagesWatch | None = None, before_first_step: Callable | None = None):
    """The Trainer of the stage and what runs in its step, in the order curriculum/step.py lists: its loss
    (AnswerOnlyLossTrainer with answer_only_logits on), its batches (trainer_collate), and the callbacks: the log
    line, the progress bar, TensorBoard, the guard (`guard`: stop signals, a diverged loss), the earlier stages'
    losses (`watch`), and `before_first_step(trainer)`. The speed patches in the forward are bound to the model
    already (train_stage)."""
    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from curriculum import step

    world = processes().num_processes
    total = planned_steps(len(train_ds), size, cfg, world)
    print_main(f"Effective batch size {size.batch_size * world * size.grad_accum} = {size.batch_size} per process x "
               f"{world} process(es) x {size.grad_accum} accumulation step(s); {total} optimizer steps planned")
    on_gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=total, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=size.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=size.grad_accum, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
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
        # No host synchronisation per step to hide a NaN loss behind the average (the Trainer's filter reads the loss
        # on the host, twice, while the GPU still runs the backward): a NaN shows in the log, and the guard stops the
        # stage once the weights follow (faults.StageGuard).
        logging_nan_inf_filter=False,
        # the batch's copy to the GPU (from pinned memory) queued behind the step before, not waited for
        accelerator_config={"non_blocking": on_gpu},
    )
    one_gpu_per_process(args, world)
    align_special_tokens(model, processor.tokenizer)  # what the Trainer would do, without its warning
    trainer_class = step.AnswerOnlyLossTrainer if patches["answer_only_logits"].on else Trainer
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            data_collator=trainer_collate(model, processor, patches),
                            processing_class=processor)
    trainer.remove_callback(ProgressCallback)  # the Trainer calls its callbacks in the order they are added
    trainer.add_callback(step.StepLogLine())
    trainer.add_callback(step.ProgressBarOnly())
    if cfg.tensorboard and is_main_process():  # written by one process
        trainer.add_callback(step.tensorboard(cfg.output_dir))
    if guard is not None:
        trainer.add_callback(step.StopOnSignalOrDivergence(guard))
    if watch is not None and watch.splits:
        trainer.add_callback(step.WatchEarlierStages(watch, trainer.evaluate))
    if before_first_step is not None:
        trainer.add_callback(step.MeasureBeforeFirstStep(functools.partial(before_first_step, trainer)))
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
    data_files: dict | None  # {train_file: {path, sha256}, ...}: what the stage saw, by content (main process only)
    replay: dict | None  # earlier stages' training records mixed into train: which, how many, their files' SHA-256
    earlier_splits: dict  # {"stage1": dev split, ...}: every earlier stage's dev split, watched during the stage


def load_stage_data(cfg: StageConfig, lineage: Lineage, processor) -> StageData:
    """Setup data: every split of the stage loaded and checked, the earlier stages' (curriculum/forgetting.py: their
    training records replayed, their dev splits watched), and the split the previous stage ended on."""
    own_train = load_split(cfg.train_file, processor, cfg, "train")
    eval_ds = load_split(cfg.eval_file, processor, cfg, "eval") if cfg.eval_file else None
    hashes = split_hashes(cfg) if is_main_process() else None  # one process hashes them

    def load_earlier(path: str, name: str, stage: RecordedStage) -> VQADataset:
        return load_split(path, processor, as_read_by(cfg, stage.dir), name)  # with that stage's columns

    replayed = forgetting.replay_records(cfg.replay, cfg.seed, len(own_train), lineage.chain, load_earlier)
    train_ds = own_train if replayed is None else dataclasses.replace(
        own_train, records=own_train.records + replayed.records,
        lengths=None if own_train.lengths is None or replayed.lengths is None else own_train.lengths + replayed.lengths)
    earlier_splits = forgetting.earlier_dev_splits(lineage.chain, load_earlier) if cfg.watch_earlier_stages else {}
    # first_eval_loss is measured on the split the previous stage ended on, so the two numbers compare.
    prev_eval_file = lineage.previous_metrics.get("final_eval_file")
    if lineage.continues and prev_eval_file and Path(prev_eval_file).exists():  # a file, or a dataset folder
        continuity = (load_split(prev_eval_file, processor, as_read_by(cfg, lineage.prev_checkpoint),
                                 "previous stage's eval"), prev_eval_file)
    else:
        continuity = eval_ds, cfg.eval_file
        if lineage.continues:
            print_main(f"WARNING: {lineage.prev_checkpoint} records no eval split; first_eval_loss uses this stage's "
                       "own")
    return StageData(train_ds, eval_ds, *continuity, hashes, replayed.record if replayed else None, earlier_splits)


@dataclass
class StageStart:
    """What a stage chose and measured before its first step, saved in <output_dir>.partial (STAGE_START) so that a
    resumed run neither chooses nor measures it again."""
    batch_size_chosen: int | str  # the micro-batch (batch_size: auto's choice, the plan's, or the config's)
    plan: dict | None  # effective_batch: the plan chosen and what it measured
    first_eval_loss: float | None = None  # continuity: on the split the previous stage ended on
    first_eval_loss_own_split: float | None = None
    SAVED: ClassVar = ("batch_size_chosen", "plan", "first_eval_loss", "first_eval_loss_own_split")
    measured_at: float | None = None  # when measure() ended (not saved): train_seconds counts training only

    @classmethod
    def read(cls, work_dir: Path) -> StageStart:
        saved = json.loads((work_dir / STAGE_START).read_text())
        return cls(**{key: saved.get(key) for key in cls.SAVED})

    def measure(self, trainer, data: StageData, cfg: StageConfig, lineage: Lineage, work_dir: Path) -> None:
        """The losses before the first step (continuity with the previous stage), saved for a resumed run."""
        self.first_eval_loss = eval_loss(trainer, data.continuity, "first_eval")
        self.first_eval_loss_own_split = (eval_loss(trainer, data.eval, "first_own_eval")
                                          if data.continuity is not data.eval else self.first_eval_loss)
        print_main(f"first_eval_loss {self.first_eval_loss} (before the first step; previous stage ended at "
                   f"{lineage.previous_metrics.get('final_eval_loss')})")
        if lineage.continues:
            print_main(f"Stage {cfg.stage}: starting from the adapter saved by stage "
                       f"{lineage.previous_metrics.get('stage', '?')}")
        if trainer.is_world_process_zero():
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / STAGE_START).write_text(json.dumps({"config": dataclasses.asdict(cfg),
                                                            **{key: getattr(self, key) for key in self.SAVED}}))
        self.measured_at = time.time()


@dataclass
class Fit:
    """What training gave: the Trainer (its state and log history), its result, and what was measured around it."""
    trainer: Any
    result: Any  # the Trainer's TrainOutput
    size: StepSize
    plan: dict | None  # effective_batch: the plan chosen (or kept by a resumed run) and what it measured
    patches: dict  # the speed patches' decisions, with the plan's offload
    start: StageStart  # measured before the first step (or by the interrupted run)
    train_seconds: float
    resumed_at: int  # the step an interrupted run resumed from; 0 from the start
    watch: forgetting.EarlierStagesWatch  # the earlier stages' dev losses during the stage


def fit(model, processor, data: StageData, cfg: StageConfig, lineage: Lineage, patches: dict, work_dir: Path,
        resume_from: str | None) -> Fit:
    """Choose the step's size (or keep a resumed run's), build the Trainer, carry the previous stage's optimizer
    moments over if asked, measure the losses before the first step, train. A diverged loss, a stop signal or a full
    disk ends the stage here, saying what to do."""
    faults.dataloader_workers_follow_the_trainer()  # workers leave stop signals to this process, and end with it
    resumed = StageStart.read(work_dir) if resume_from else None  # what the interrupted run chose and measured
    size, plan, patches = choose_step_size(model, processor, data.train, cfg, patches, resumed)
    start = resumed or StageStart(size.batch_size, plan)
    guard = faults.StageGuard(model)  # from here on a stop signal ends the stage after a step, with a checkpoint
    watch = forgetting.EarlierStagesWatch(data.earlier_splits, cfg, work_dir, resumed=bool(resume_from))
    trainer = build_trainer(model, processor, data.train, data.eval, cfg, size, patches, work_dir, guard, watch,
                            before_first_step=None if resumed else lambda trainer: start.measure(
                                trainer, data, cfg, lineage, work_dir))
    if cfg.optimizer_state == "resume" and not resume_from:  # a resumed run restores its own optimizer
        trainer.create_optimizer()
        moments = lineage.folder / OPTIMIZER_MOMENTS
        n = adapter_files.load_optimizer_moments(model, trainer.optimizer, moments)
        print_main(f"Resumed AdamW moments for {n} LoRA tensors from {lineage.prev_checkpoint} (schedule starts anew)")
    if resumed:
        print_main(f"Resuming stage {cfg.stage} from {resume_from}: the step, optimizer, scheduler, RNG and data order "
                   "are restored")
    resumed_at = int(Path(resume_from).name.rsplit("-", 1)[1]) if resume_from else 0  # checkpoint-<step>
    resumed_training_at = time.time()
    with faults.disk_full_stops_the_stage(f"a checkpoint in {work_dir}", work_dir, work_dir, cfg.output_dir,
                                          lineage.prev_checkpoint):
        result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - (start.measured_at or resumed_training_at)
    guard.raise_if_stopped(trainer, work_dir, cfg.lr)
    # the earlier stages' losses at the end; raises if forgetting stopped the stage
    watch.end(trainer.state, work_dir, trainer.evaluate)
    return Fit(trainer, result, size, plan, patches, start, train_seconds, resumed_at, watch)


def check_saved_adapter(saved_tensors: dict, trainable: int, staging: Path) -> None:
    """The file written holds exactly the LoRA parameters that trained: an empty or partial adapter (what the
    Trainer writes under FSDP through peft's filter) never passes for a stage."""
    saved = sum(t.numel() for t in saved_tensors.values())
    if saved != trainable:
        raise CurriculumError(f"the adapter written to {staging} holds {saved:,} LoRA parameters, but {trainable:,} "
                              "were trained; nothing was saved as the stage")


def save_stage(trainer, model, processor, cfg: StageConfig, lineage: Lineage, metrics: dict,
               predictions: list | None, staging: Path) -> Path:
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
    card = stage_record.model_card(cfg, lineage, metrics, accuracy)
    (staging / "README.md").write_text(card)  # not peft's empty template
    if predictions is not None:
        write_predictions(predictions, staging / "predictions_dev.jsonl")
    for plot in write_stage_plots(staging):
        print_main(f"Plot: {out / plot.name}")
    stage_folder.move_into_place(staging, out)  # an old stage there (overwrite: true) is kept until the new one is in
    return out


def train_stage(cfg: StageConfig, patch_decisions: dict[str, speed.PatchDecision]) -> dict:
    """One stage: setup data -> setup model -> prove -> fit -> measure -> save. `patch_decisions`: the speed
    patches as validate_config decided them. Returns its stage_metrics."""
    from transformers import set_seed

    set_seed(cfg.seed)
    trained_by = recipe_check.trained_by(Path(__file__))  # this file's hash and static check, for the stage's record
    model_path = resolve_model_path(cfg.model_name_or_path)
    processor = load_processor(model_path, cfg)
    lineage = resolve_lineage(cfg.prev_checkpoint)  # the stages this one continues, decided here once
    data = load_stage_data(cfg, lineage, processor)
    work_dir = Path(f"{cfg.output_dir}.partial")  # intermediate checkpoints; removed once the stage is saved
    with processes().main_process_first():  # the main process tidies work_dir; the others then read the same
        # before the long model load: a mismatch is reported at once
        resume_from = faults.interrupted_run(work_dir, dataclasses.asdict(cfg))

    # The curriculum: stage 1 wraps the base in a new adapter; a later stage reopens the previous stage's adapter
    # for training. Either way, proved before the first step to be the one adapter that trains.
    model = load_quantized_base(model_path, cfg)
    if lineage.prev_checkpoint:
        model = continue_adapter(model, lineage.prev_checkpoint)
    else:
        model = new_adapter(model, cfg.lora, cfg.seed)
    patches = speed.apply_speed_patches(model, cfg, patch_decisions, print_main)
    process_views = prove_adapter(model, cfg.lora, lineage)

    fitted = fit(model, processor, data, cfg, lineage, patches, work_dir, resume_from)
    final_eval = eval_loss(fitted.trainer, data.eval, "final_eval")
    print_main(f"final_eval_loss {final_eval}")
    process_views = adapter_files.check_trained_adapter_on_every_process(model, process_views)
    dev_metrics, predictions = evaluate_dev_split(model, processor, data.eval, cfg, len(process_views))
    if data.earlier_splits and cfg.eval_questions and not fsdp_enabled():  # the earlier stages' dev splits, answered
        fitted.watch.answer(lambda records: evaluate_records(model, processor, records, cfg)[0], cfg.eval_questions)
    metrics = stage_record.stage_metrics(cfg, lineage, trained_by, data, fitted, process_views, fitted.patches,
                                         final_eval, dev_metrics)

    staging = Path(f"{cfg.output_dir}.saving")
    with faults.disk_full_stops_the_stage(f"the stage to {staging}", staging, work_dir, cfg.output_dir,
                                          lineage.prev_checkpoint):
        out = save_stage(fitted.trainer, model, processor, cfg, lineage, metrics, predictions, staging)
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
        patch_decisions = validate_config(cfg, training=not check)
        print_main(f"Config {config_path} (the keys set; every key, defaults included, is saved with the stage as "
                   f"{RESOLVED_CONFIG}):\n" + yaml.safe_dump(keys_set(cfg), sort_keys=False, width=1000).rstrip())
        print_main(runtime())
        if check:
            check_data(cfg)
        else:
            train_stage(cfg, patch_decisions)
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
