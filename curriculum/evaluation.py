"""Evaluation by generation: batched greedy answers with the chat template, parsed and scored (curriculum/scoring.py),
spread over the processes. The trainer calls it at the end of a stage; vqa_eval.py for any split and adapter.

torch is imported inside the functions that run the model, so that importing this module (the trainer, the
scoring tests) stays light.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

from curriculum.config import StageConfig
from curriculum.processes import fsdp_enabled, gather_from_processes, is_main_process, print_main, processes
from curriculum.records import Record, prompt_and_images
from curriculum.scoring import compute_metrics, gold_answer, is_correct, metrics_table, parse_answer
from curriculum.stage_folder import RESOLVED_CONFIG

# ---------------------------------------------------------------------------------------------------------------------
# Generation: batched greedy decoding with the chat template
# ---------------------------------------------------------------------------------------------------------------------


class GenerationInputs:
    """Records -> one left-padded batch of model inputs (chat template, image decode and resize, tokenise). Run as
    a DataLoader's collate function, so the next batch is prepared in a worker while the GPU generates."""

    def __init__(self, processor, min_pixels: int, max_pixels: int):
        self.processor, self.min_pixels, self.max_pixels = processor, min_pixels, max_pixels

    def __call__(self, batch: list[Record]):
        processor = self.processor
        prompts = [prompt_and_images(processor, r, self.min_pixels, self.max_pixels) for r in batch]
        texts = [text for text, _ in prompts]
        images = [img for _, imgs in prompts for img in imgs]
        # left padding, so every prompt ends where generation starts
        old_side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
        try:
            return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            processor.tokenizer.padding_side = old_side


def generate_answers(model, processor, records: list[Record], cfg: StageConfig, batch_size: int,
                     max_new_tokens: int, progress: bool = True) -> list[str]:
    """Raw answers, in the order of `records`, greedy. Inputs are prepared in cfg.dataloader_num_workers worker
    processes, one batch ahead of the GPU."""
    import torch
    from torch.utils.data import DataLoader

    tokenizer = processor.tokenizer
    device = next(p for p in model.parameters()).device
    workers = min(cfg.dataloader_num_workers, math.ceil(len(records) / batch_size) - 1)  # none for one batch
    batches = DataLoader(records, batch_size=batch_size, shuffle=False, num_workers=max(workers, 0),
                         collate_fn=GenerationInputs(processor, cfg.min_pixels, cfg.max_pixels),
                         pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for inputs in tqdm(batches, desc="generate", disable=not progress):
            inputs = inputs.to(device, non_blocking=True)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs


def merge_answers(parts: list[list[tuple[int, str]]], n: int) -> list[str]:
    """The (index, answer) pairs of every process, as one list in question order; a question answered twice or
    not at all is an error, never a silently wrong count."""
    by_index: dict[int, str] = {}
    for part in parts:
        for i, text in part:
            if i in by_index:
                raise RuntimeError(f"question {i} was answered by two processes")
            by_index[i] = text
    missing = sorted(set(range(n)) - by_index.keys())
    if missing or len(by_index) != n:
        raise RuntimeError(f"{len(missing)} of {n} questions got no answer from any process, e.g. {missing[:5]}")
    return [by_index[i] for i in range(n)]


def evaluate_records(model, processor, records: list[Record], cfg: StageConfig) -> tuple[dict, list[dict]]:
    """Generate, parse and score. Returns (metrics, predictions) with one prediction row per record. With several
    processes (DDP), each answers every N-th question and all answers are gathered on every process."""
    state = processes()
    mine = list(range(state.process_index, len(records), state.num_processes))
    answers = generate_answers(model, processor, [records[i] for i in mine], cfg, cfg.eval_batch_size,
                               cfg.max_new_tokens, progress=is_main_process())
    raw = merge_answers(gather_from_processes(list(zip(mine, answers, strict=True))), len(records))
    predictions = []
    for rec, text in zip(records, raw, strict=True):
        gold, pred = gold_answer(rec), parse_answer(text, rec.type, rec.options)
        # what was asked, as the model read it: the chat template's text (the image as its placeholder token) and
        # the image's file (absolute), so that an answer can be reproduced without this code
        prompt = processor.apply_chat_template(rec.prompt_messages, add_generation_prompt=True, tokenize=False)
        image = os.path.abspath(rec.image) if rec.image else None
        predictions.append({"id": rec.id, "type": rec.type, "image": image, "prompt": prompt, "raw_output": text,
                            "parsed": pred, "gold": gold, "correct": is_correct(pred, gold, rec.type)})
    rows = [{"type": p["type"], "gold": p["gold"], "pred": p["parsed"]} for p in predictions]
    return compute_metrics(rows, cfg.numeric_tolerance), predictions


def write_predictions(predictions: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions))


def evaluate_dev_split(model, processor, eval_ds, cfg: StageConfig, world: int) -> tuple:
    """The end of a stage: its dev questions (`cfg.eval_questions` of `eval_ds`, the recipe's dev VQADataset, or None)
    answered by generation and scored by question type, the table logged. Returns (metrics, predictions), or
    (None, None) when not measured."""
    if eval_ds is None or not cfg.eval_questions:
        return None, None
    if fsdp_enabled():
        print_main("Dev accuracy by generation is skipped under FSDP (the model is sharded across processes); measure "
                   f"it on one GPU: python vqa_eval.py {cfg.output_dir}/{RESOLVED_CONFIG}")
        return None, None
    records = eval_ds.records if cfg.eval_questions < 0 else eval_ds.records[:cfg.eval_questions]
    dev_metrics, predictions = evaluate_records(model, processor, records, cfg)
    print_main(f"Dev accuracy after stage {cfg.stage} ({len(records)} questions, by generation"
               f"{f' on {world} processes' if world > 1 else ''}):\n" + metrics_table(dev_metrics))
    return dev_metrics, predictions
