"""Speed and memory of the project's training path on an 8B-shaped Qwen3-VL, next to the yardstick.

Runs on the GPU machine (bench/gpu_speed.sh sets it up and runs the yardstick first, in the same call).
Everything timed here goes through the trainer's own pieces: `load_quantized_base`, `new_adapter`,
`build_trainer` (HF Trainer, our collate, our loss) and `VQADataset` (images decoded and processed in
dataloader workers from PNG files on disk). Only the data are synthetic: one image per sample, a ~48-token
question and an 8-token answer, like the yardstick's two workloads.

    python bench/speed.py --ckpt /tmp/q8b --out OUT [--variants NAME ...] [--steps 12]

Each variant is a set of config keys; the model is loaded once per value of fp32_upcast and reused.
Writes OUT/speed.json and prints one row per variant; bench/report.py turns it into the README table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_qlora_qwen3vl as tq  # noqa: E402
from curriculum import faults, speed  # noqa: E402
from curriculum.answer_loss import answer_only_loss  # noqa: E402
from curriculum.base_model import load_processor  # noqa: E402
from curriculum.config import StageConfig  # noqa: E402
from curriculum.data_files import load_records  # noqa: E402

# name -> (image side in pixels, config keys). "defaults" is what a user gets without setting anything; "-bsN"
# fixes the batch size instead of letting batch_size: auto choose it.
# every lever of the project's path off: the textbook recipe, through the trainer's own code
TEXTBOOK = dict(fp32_upcast=True, answer_only_logits=False, liger_kernels=False, fused_lora_forward=False,
                batched_vision_attention=False, vision_without_autocast=False, drop_padding_mask=False,
                deepstack_by_index=False, fused_lora_dropout=False)
# the levers of 2026-12-02 (later session) off, to time them against the same batch in one call
BEFORE_LEVERS = dict(vision_without_autocast=False, drop_padding_mask=False, deepstack_by_index=False,
                    fused_lora_dropout=False)
VARIANTS = {
    "W448-textbook-bs4": (448, dict(batch_size=4, **TEXTBOOK)),
    "W448-defaults-bs16": (448, dict(batch_size=16)),
    "W448-defaults-bs32": (448, dict(batch_size=32)),
    "W448-gc0.5-bs16": (448, dict(batch_size=16, checkpointed_layers=0.5)),
    "W448-gc0.5-bs24": (448, dict(batch_size=24, checkpointed_layers=0.5)),
    "W448-gc0.25-bs16": (448, dict(batch_size=16, checkpointed_layers=0.25)),
    "W448-nogc-bs8": (448, dict(batch_size=8, gradient_checkpointing=False)),
    "W448-nogc-bs16": (448, dict(batch_size=16, gradient_checkpointing=False)),
    "W448-fullogits-bs16": (448, dict(batch_size=16, answer_only_logits=False)),
    "W448-nodropout-bs32": (448, dict(batch_size=32, lora={"dropout": 0.0})),
    "W896-defaults-bs8": (896, dict(batch_size=8)),
    "W896-gc0.5-bs8": (896, dict(batch_size=8, checkpointed_layers=0.5)),
    "W896-lowmem-bs2": (896, dict(batch_size=2)),
    "W896-lowmem-bs4": (896, dict(batch_size=4)),
    "W448-defaults-bs48": (448, dict(batch_size=48)),
    "W448-defaults-bs64": (448, dict(batch_size=64)),
    "W896-defaults-bs16": (896, dict(batch_size=16)),
    # the defaults: batch_size: auto, the batch measured and chosen for memory_budget_gib: 20
    "W448-defaults": (448, {}),
    "W896-defaults": (896, {}),
    "W896-lowmem": (896, dict(memory_budget_gib=12)),  # the low-memory preset: a 12 GiB budget
    # without Liger's fused kernels (liger_kernels: auto turns them on where the GPU and the package are)
    "W448-noliger-bs32": (448, dict(batch_size=32, liger_kernels=False)),
    "W896-noliger-bs16": (896, dict(batch_size=16, liger_kernels=False)),
    # one lever off at a time: peft's own LoRA forward; Liger without its SwiGLU (_swiglu: a bench-only switch)
    "W448-defaults-peftlora": (448, dict(fused_lora_forward=False)),
    "W448-defaults-noswiglu": (448, dict(_swiglu=False)),
    "W448-defaults-pervision": (448, dict(batched_vision_attention=False)),
    "W896-defaults-pervision": (896, dict(batched_vision_attention=False)),
    "W896-defaults-peftlora": (896, dict(fused_lora_forward=False)),
    "W896-defaults-noswiglu": (896, dict(_swiglu=False)),
    # the layer inputs kept in pinned CPU memory between forward and backward (offload_activations)
    "W448-offload": (448, dict(offload_activations=True)),
    "W448-offload-bs96": (448, dict(batch_size=96, offload_activations=True)),
    "W448-offload-bs64": (448, dict(batch_size=64, offload_activations=True)),
    "W448-offload-bs64-before": (448, dict(batch_size=64, offload_activations=True, **BEFORE_LEVERS)),
    "W448-offload-bs64-torchdropout": (448, dict(batch_size=64, offload_activations=True, fused_lora_dropout=False)),
    "W896-offload-bs16-torchdropout": (896, dict(batch_size=16, offload_activations=True, fused_lora_dropout=False)),
    "W448-offload-bs64-withmask": (448, dict(batch_size=64, offload_activations=True, drop_padding_mask=False)),
    "W896-offload-bs16": (896, dict(batch_size=16, offload_activations=True)),
    "W896-offload-bs16-before": (896, dict(batch_size=16, offload_activations=True, **BEFORE_LEVERS)),
    "W896-offload-bs16-withmask": (896, dict(batch_size=16, offload_activations=True, drop_padding_mask=False)),
    "W448-offload-budget11": (448, dict(memory_budget_gib=11, offload_activations=True)),
    # streamed_layers: the first layers' saved tensors in CPU memory instead of recomputed, at the micro-batches the
    # plans chose at Unsloth's memory (W448: 32 x 2, W896: 8 x 2, both 35/36 checkpointed, none offloaded)
    "W448-bs32-stream0": (448, dict(batch_size=32)),
    "W448-bs32-stream0.33": (448, dict(batch_size=32, streamed_layers=1 / 3)),
    "W896-bs8-stream0": (896, dict(batch_size=8)),
    "W896-bs8-stream0.33": (896, dict(batch_size=8, streamed_layers=1 / 3)),
    "W896-offload": (896, dict(offload_activations=True)),
    "W896-offload-bs24": (896, dict(batch_size=24, offload_activations=True)),
    "W896-offload-budget8": (896, dict(memory_budget_gib=8, offload_activations=True)),
    "W896-offload-budget11": (896, dict(memory_budget_gib=11, offload_activations=True)),
    "W896-budget11": (896, dict(memory_budget_gib=11)),
    "W448-budget11": (448, dict(memory_budget_gib=11)),
    "W896-budget8": (896, dict(memory_budget_gib=8)),
    # M-RoPE positions computed in the forward (transformers' own), against the dataloader (the default)
    "W448-positions-off-bs64": (448, dict(batch_size=64, positions_in_dataloader=False)),
    "W896-positions-off-bs16": (896, dict(batch_size=16, positions_in_dataloader=False)),
    # effective_batch: the plan for a budget. 12 and 11.2 GiB leave 10.8 and 10.1 usable (90%): Unsloth's peaks at
    # its batch 64 (W448) and 16 (W896); auto: the whole free card
    "W448-plan64-budget12": (448, dict(effective_batch=64, memory_budget_gib=12.0)),
    "W448-plan64-budget20": (448, dict(effective_batch=64, memory_budget_gib=20.0)),
    "W448-plan64-auto": (448, dict(effective_batch=64, memory_budget_gib="auto")),
    "W896-plan16-budget11.2": (896, dict(effective_batch=16, memory_budget_gib=11.2)),
    "W896-plan16-budget20": (896, dict(effective_batch=16, memory_budget_gib=20.0)),
    "W896-plan16-auto": (896, dict(effective_batch=16, memory_budget_gib="auto")),
    # the same plans, also timed with a third and two thirds of their checkpointed layers streamed
    "W448-plan64-budget12-stream": (448, dict(effective_batch=64, memory_budget_gib=12.0, streamed_layers="auto")),
    "W896-plan16-budget11.2-stream": (896, dict(effective_batch=16, memory_budget_gib=11.2, streamed_layers="auto")),
    "smoke-W64": (64, dict(batch_size=2)),  # CPU smoke test of this script with --ckpt models/tiny-qwen3vl
    "smoke-W64-plan": (64, dict(effective_batch=4, batch_size="auto")),
    "smoke-W64-offload": (64, dict(batch_size=2, offload_activations=True)),
    "smoke-W64-textbook": (64, dict(batch_size=2, **TEXTBOOK)),
}


def make_dataset(root: Path, px: int, n_records: int, n_images: int = 48) -> Path:
    """n_images random PNGs of px x px and n_records numeric questions over them (cycled)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        if not (root / f"{i}.png").is_file():
            Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(root / f"{i}.png")
    words = ("how many red squares blue circles green triangles are visible in the upper left part of this "
             "picture counting only shapes that do not touch the border or any other shape").split()
    with open(root / "train.jsonl", "w") as f:
        for i in range(n_records):
            question = " ".join(words[(i + k) % len(words)] for k in range(30)) + "?"
            f.write(json.dumps({"id": str(i), "image": f"{i % n_images}.png", "question": question,
                                "type": "numeric", "answer": str(1000000 + 7919 * i)[:7]}) + "\n")
    return root / "train.jsonl"


def stage_config(ckpt: str, train_file: Path, px: int, steps: int, keys: dict) -> StageConfig:
    data = dict(output_dir="/tmp/speed_out/stage", train_file=str(train_file), model_name_or_path=ckpt,
                min_pixels=px * px, max_pixels=px * px, max_steps=steps, eval_steps=0, save_steps=0,
                logging_steps=1000, tensorboard=False, eval_questions=0, warmup_ratio=0.0,
                dataloader_num_workers=min(8, (os.cpu_count() or 2) - 1), max_seq_len=4096)
    lora = keys.pop("lora", {})
    data.update({k: v for k, v in keys.items() if not k.startswith("_")})
    cfg = StageConfig(**data)
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return cfg


def apply_liger(model, processor, train_file: Path, px: int, cfg: StageConfig) -> dict:
    """speed.apply_liger_kernels on the loaded model, with the loss on one fixed batch before and after
    (the kernels must not change what is computed beyond bf16 rounding)."""
    import torch

    records = load_records(train_file)[:8]
    batch = tq.collate_batch([tq.encode_example(processor, r, px * px, px * px) for r in records],
                             processor.tokenizer.pad_token_id)
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = {k: v.to(device) for k, v in batch.items()}

    def loss() -> float:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return answer_only_loss(model, batch)[0].item()

    before = loss()
    why = speed.liger_problem()
    if why:
        return {"liger_kernels": f"off: {why}"}
    speed.apply_liger_kernels(model)
    after = loss()
    return {"liger_kernels": "on", "loss_before": round(before, 5), "loss_after": round(after, 5),
            "abs_diff": round(abs(after - before), 5)}


_kernel_check = []


def kernel_checked(model) -> str | None:
    """speed.check_lora_dropout_kernel on the model's device, once a run: None when the kernel agrees with torch."""
    if not _kernel_check:
        device = next(p.device for p in model.parameters() if p.requires_grad)
        _kernel_check.append(speed.check_lora_dropout_kernel(device) if device.type == "cuda" else "no GPU")
        print(json.dumps({"fused_lora_dropout_check": _kernel_check[0] or "passed"}))
    return _kernel_check[0]


def set_variant_forwards(model, cfg: StageConfig, swiglu: bool) -> None:
    """The variant's LoRA forward (fused or peft's), vision attention (batched or one call per image), vision tower
    with or without autocast and, where Liger is on, its SwiGLU (or the MLP's own)."""
    from peft.tuners.lora.bnb import Linear4bit
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    visual = model.get_base_model().model.visual
    for module in model.modules():
        if isinstance(module, (Linear4bit, Qwen3VLVisionAttention)) or module is visual:
            module.__dict__.pop("forward", None)  # back to the class's (peft's, transformers') forward
            module.__dict__.pop("lora_down_kernel", None)
    if cfg.fused_lora_forward is not False:
        speed.fuse_lora_updates(model)
        if cfg.fused_lora_dropout is not False and kernel_checked(model) is None:
            speed.bind_lora_dropout_kernel(model)
    if cfg.batched_vision_attention is not False:
        speed.batch_vision_attention(model)
    if cfg.vision_without_autocast is not False and cfg.fp32_upcast is False:
        assert speed.run_vision_tower_without_autocast(model) is None
    text_model = model.get_base_model().model.language_model
    text_model.__dict__.pop("_deepstack_process", None)
    if cfg.deepstack_by_index is not False:
        speed.add_deepstack_by_index(model)
    for layer in model.get_base_model().model.language_model.layers:
        mlp = layer.mlp.__dict__
        if "forward" in mlp:  # Liger's SwiGLU, bound by apply_liger_kernels: kept to bind again
            mlp["_liger_forward"] = mlp["forward"]
        if swiglu and "_liger_forward" in mlp:
            mlp["forward"] = mlp["_liger_forward"]
        else:
            mlp.pop("forward", None)  # the MLP's own forward


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke test)"


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter())

    return StepTimer()


def pipeline_rate(dataset, cfg: StageConfig, batches: int) -> float:
    """Samples/s of the input pipeline alone (decode, resize, tokenise, collate) with the trainer's workers."""
    import torch
    from torch.utils.data import DataLoader

    pad = dataset.processor.tokenizer.pad_token_id
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.dataloader_num_workers,
                        collate_fn=lambda ex: tq.collate_batch(ex, pad), pin_memory=torch.cuda.is_available(),
                        shuffle=True)
    it = iter(loader)
    next(it)  # workers started
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += next(it)["input_ids"].shape[0]
    return n / (time.perf_counter() - t)


def sync_sites_callback(out: Path, name: str, at_step: int):
    """One step under torch.cuda.set_sync_debug_mode("warn"): every host synchronisation of that step with the
    Python lines that asked for it, counted by site (OUT/sync_sites_NAME.txt): which of a step's syncs can go."""
    import collections
    import traceback
    import warnings

    import torch
    from transformers import TrainerCallback

    class SyncSites(TrainerCallback):
        sites = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                self.sites, self.shown = collections.Counter(), warnings.showwarning

                def record(message, category, filename, lineno, file=None, line=None):
                    if "synchronizing" not in str(message):
                        return self.shown(message, category, filename, lineno, file, line)
                    frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
                    self.sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                           for f in reversed(frames[-5:]))] += 1

                warnings.showwarning = record
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kwargs):
            if self.sites is not None and state.global_step == at_step + 1:
                torch.cuda.set_sync_debug_mode("default")
                warnings.showwarning = self.shown
                lines = [f"{n:5d}  {site}" for site, n in self.sites.most_common()]
                (out / f"sync_sites_{name}.txt").write_text(
                    f"== {name}: {sum(self.sites.values())} host synchronisations in one step, by site\n"
                    + "\n".join(lines) + "\n")
                self.sites = None

    return SyncSites()


def idle_gaps(trace: dict, top: int = 25) -> str:
    """Where the GPU waits, from a torch.profiler chrome trace: the gaps of 20 us or more between kernels on the
    stream that runs most of them, each put down to the CPU ops that were running when the kernel after it was
    launched (outermost first), summed by those ops: the host work that the GPU waited for."""
    import bisect
    import collections

    events = trace["traceEvents"]
    on_gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy") and "dur" in e]
    busy = collections.Counter()
    for e in on_gpu:
        busy[e["args"].get("stream")] += e["dur"]
    main = busy.most_common(1)[0][0]
    kernels = sorted((e for e in on_gpu if e["args"].get("stream") == main), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and "dur" in e), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    by_site, total, largest = collections.Counter(), 0.0, []
    for before, after in zip(kernels, kernels[1:], strict=False):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap < 20:
            continue
        total += gap
        launch = launches.get(after["args"].get("correlation"))
        at = launch["ts"] if launch else after["ts"]
        i = bisect.bisect_right(starts, at)
        around = [e for e in ops[max(0, i - 4000):i] if e["ts"] + e["dur"] >= at]  # the ops open at the launch
        around.sort(key=lambda e: -e["dur"])
        names = [e["name"] for e in around]
        site = " > ".join(names[:2] + (["..."] if len(names) > 3 else []) + names[-1:] if len(names) > 2 else names)
        by_site[site or "(no CPU op)"] += gap
        largest.append((gap, after["ts"], before["name"], after["name"], site))
    lines = [f"{t / 1e3:8.1f} ms  {site}" for site, t in by_site.most_common(top)]
    largest.sort(key=lambda g: -g[0])
    first = kernels[0]["ts"] if kernels else 0
    lines += ["-- the largest gaps: ms, at ms from the first kernel, kernel before -> kernel after (its CPU op)"]
    lines += [f"{gap / 1e3:8.2f} at {(at - first) / 1e3:8.1f}  {b[:50]} -> {a[:50]} ({site})"
              for gap, at, b, a, site in largest[:12]]
    return f"GPU idle on the main stream in gaps of 20 us or more: {total / 1e3:.1f} ms\n" + "\n".join(lines)


def profiler_callback(out: Path, name: str, at_step: int):
    """torch.profiler over the two steps after at_step (the timed ones): where the CPU and GPU time of a step go."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA],
                                                   record_shapes=True)
                self.prof.__enter__()
                sync()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == at_step + 2:
                sync()
                wall = time.perf_counter() - self.t0  # against the GPU's busy time below: how long it sat idle
                self.prof.__exit__(None, None, None)
                averages = self.prof.key_averages()
                # GPU busy: the kernels' own time (copies left out: offload_activations runs them on a side stream,
                # beside the kernels; on the main stream they are few)
                busy = sum(e.self_device_time_total for e in averages
                           if e.device_type.name == "CUDA" and not e.key.startswith("Memcpy")) / 1e6 / 2
                calls = {e.key: e.count for e in averages}
                (out / f"profile_{name}.json").write_text(json.dumps(
                    {"profiled_step_s": round(wall / 2, 4), "gpu_busy_step_s": round(busy, 4),
                     "gpu_idle_share": round(max(0.0, 1 - busy / (wall / 2)), 3),
                     "syncs_per_step": calls.get("cudaStreamSynchronize", 0) / 2,
                     "nonzero_per_step": calls.get("aten::nonzero", 0) / 2}))
                # the copies and casts by the shapes they copy: which tensors are cast (the profile's 7.6%)
                copies = [e for e in self.prof.key_averages(group_by_input_shape=True)
                          if e.key in ("aten::copy_", "aten::_to_copy")]
                copies.sort(key=lambda e: -e.device_time_total)
                text = (f"== {name}: two steps, {wall:.3f} s wall\n"
                        + averages.table(sort_by="self_cpu_time_total", row_limit=30)
                        + "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=25)
                        + "\n== copies and casts by input shapes (CUDA total, calls)\n"
                        + "\n".join(f"{e.device_time_total / 1e3:9.1f} ms {e.count:6d}  {e.key} {e.input_shapes}"
                                     for e in copies[:20]))
                trace = Path(f"/tmp/trace_{name}.json")
                self.prof.export_chrome_trace(str(trace))
                text += "\n== where the GPU waits (two steps)\n" + idle_gaps(json.loads(trace.read_text()))
                (out / f"profile_{name}.txt").write_text(text)
                self.prof = None

    return Profile()


def run_variant(model, processor, name: str, px: int, cfg: StageConfig, warmup: int, load_s: float,
                profile_dir: Path | None = None, swiglu: bool = True, pipeline: bool = True,
                measured: dict | None = None) -> dict:
    """One variant, through the trainer's pieces as train_stage runs them: batch_size: auto or the plan of
    effective_batch (with `measured`, the plan's measurements kept across the variants of one image size), then
    the Trainer, timed per optimizer step."""
    import torch

    timed_steps = cfg.max_steps
    if profile_dir is not None:  # two more steps profiled after the timed ones, and one whose syncs are traced
        cfg = dataclasses.replace(cfg, max_steps=cfg.max_steps + 3)
    set_variant_forwards(model, cfg, swiglu)
    cfg = dataclasses.replace(cfg, answer_only_logits=cfg.answer_only_logits is not False,  # auto: on, as trained
                              positions_in_dataloader=cfg.positions_in_dataloader is not False,
                              drop_padding_mask=cfg.drop_padding_mask is not False)
    # the three patches that change the Trainer and its batches, as train_stage hands them to build_trainer
    patches = {key: speed.PatchDecision(getattr(cfg, key), "") for key in ("answer_only_logits",
                                                                           "positions_in_dataloader",
                                                                           "drop_padding_mask")}
    dataset = tq.VQADataset(load_records(cfg.train_file), processor, cfg.min_pixels, cfg.max_pixels)
    checkpointed, streamed = speed.apply_gradient_checkpointing(model, cfg)  # torch's checkpoint function back too
    offloaded = speed.offload_checkpointed_activations(model) if cfg.offload_activations else 0
    plan, plan_s = None, 0.0
    if cfg.effective_batch:  # as fit does: the plan measured, the model set to it
        t = time.perf_counter()
        chosen, plan = tq.plan_effective_batch(model, dataset, processor, cfg, patches, measured)
        plan_s = time.perf_counter() - t
        cfg = dataclasses.replace(cfg, batch_size=chosen.micro_batch, grad_accum=chosen.grad_accum)
        checkpointed, offloaded = chosen.checkpointed, chosen.checkpointed if chosen.offload else 0
        streamed = chosen.streamed
    elif cfg.batch_size == "auto":  # as train_stage does: measure steps, take the largest batch that fits
        cfg = dataclasses.replace(cfg, batch_size=tq.auto_batch_size(model, dataset, processor, cfg, patches))
    for module in model.modules():  # lora.dropout per variant, on the one adapter
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"].p = cfg.lora.dropout
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.reset_accumulated_memory_stats()  # alloc_retries: this variant's training only
    # with the guard's check after every step (non-finite weights, a stop signal), as train_stage runs it
    trainer = tq.build_trainer(model, processor, dataset, None, cfg, tq.StepSize(cfg.batch_size, cfg.grad_accum),
                               patches, Path("/tmp/speed_out/work"), faults.StageGuard(model))
    timer = step_timer()
    trainer.add_callback(timer)
    if profile_dir is not None:
        trainer.add_callback(profiler_callback(profile_dir, name, timed_steps))
        if torch.cuda.is_available():
            trainer.add_callback(sync_sites_callback(profile_dir, name, timed_steps + 2))
    t0 = time.perf_counter()
    oom = False
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        oom = True
    if oom:  # outside the except block, so the traceback's frames (and their tensors) are gone
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        return {"variant": name, "image_px": px, "batch": cfg.batch_size, "oom": True}
    first_step_s = timer.times[0] - t0
    per_step = cfg.batch_size * cfg.grad_accum  # samples per optimizer step
    steps = timer.times[warmup:timed_steps]
    dts = [b - a for a, b in zip(steps, steps[1:], strict=False)]
    mean_dt = (steps[-1] - steps[0]) / len(dts)
    sample_len = len(dataset[0]["input_ids"])
    result = {
        "variant": name, "image_px": px, "batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "memory_budget_gib": cfg.memory_budget_gib, "effective_batch": per_step, "plan": plan,
        "plan_s": round(plan_s, 1), "positions_in_dataloader": cfg.positions_in_dataloader, "seq_len": sample_len,
        "checkpointed_layers": checkpointed, "offloaded_layers": offloaded, "streamed_layers": streamed,
        "fp32_upcast": cfg.fp32_upcast,
        "answer_only_logits": cfg.answer_only_logits, "lora_dropout": cfg.lora.dropout,
        "liger_kernels": cfg.liger_kernels,
        "liger_swiglu": "forward" in model.get_base_model().model.language_model.layers[0].mlp.__dict__,
        "fused_lora_forward": cfg.fused_lora_forward, "batched_vision_attention": cfg.batched_vision_attention,
        "vision_without_autocast": cfg.vision_without_autocast is not False and not cfg.fp32_upcast,
        "drop_padding_mask": cfg.drop_padding_mask, "deepstack_by_index": cfg.deepstack_by_index is not False,
        "fused_lora_dropout": cfg.fused_lora_dropout is not False and cfg.fused_lora_forward is not False
                              and _kernel_check == [None],
        "step_s": round(mean_dt, 4), "median_step_s": round(statistics.median(dts), 4),
        "max_step_s": round(max(dts), 4),
        "samples_per_s": round(per_step / mean_dt, 2),
        "tokens_per_s": round(per_step * sample_len / mean_dt),
        "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0,
        # the caching allocator freeing its cache and trying again (a cudaFree waits for the device): near the budget
        # a suspect for the gaps before kDequantizeBlockwise in call 9's profile (counted over the training)
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries") if torch.cuda.is_available() else None,
        "first_step_s": round(first_step_s, 2), "load_s": round(load_s, 1),
        "dataloader_workers": cfg.dataloader_num_workers,
        "final_loss": trainer.state.log_history[-1].get("train_loss"),
        # what one token costs the GPU in model FLOPs: 2 x N forward + 2 x N input gradients (the base's weights get
        # no gradient); the recomputation of checkpointed layers is not counted (it is overhead, not model work)
        "language_params": language_params(model),
    }
    if profile_dir is not None and (profile_dir / f"profile_{name}.json").is_file():
        result.update(json.loads((profile_dir / f"profile_{name}.json").read_text()))
    del trainer
    gc.collect()
    torch.cuda.empty_cache()
    if pipeline:
        result["pipeline_samples_per_s"] = round(pipeline_rate(dataset, cfg, 12), 1)
    return result


def language_params(model) -> int:
    """Parameters of the language model's decoder layers (4-bit weights counted by their logical shape)."""
    layers = model.get_base_model().model.language_model.layers
    return sum(m.in_features * m.out_features for m in layers.modules()
               if hasattr(m, "in_features") and hasattr(m, "out_features") and not hasattr(m, "base_layer")
               and "lora" not in type(m).__name__.lower() and m.in_features > 64 and m.out_features > 64)


def timed_generate(model, calls: list, first_scores: list):
    """model.generate, recording for each call the clock before it, after every step's logits (the first: after
    the prefill) and after it, and the first generated token's logits."""
    from transformers import LogitsProcessor, LogitsProcessorList

    generate = model.generate

    class StepClock(LogitsProcessor):
        def __init__(self, times: list):
            self.times = times

        def __call__(self, input_ids, scores):
            sync()
            self.times.append(time.perf_counter())
            return scores

    def generate_timed(*args, **kwargs):
        sync()
        times = [time.perf_counter()]
        out = generate(*args, **kwargs, logits_processor=LogitsProcessorList([StepClock(times)]),
                       output_scores=True, return_dict_in_generate=True)
        sync()
        times.append(time.perf_counter())
        calls.append(times)
        first_scores.append(out.scores[0].float().cpu())
        return out.sequences

    return generate_timed


def compare_answers(batched: dict, single: dict, n_single: int) -> dict:
    """Answers and first-token logits of the batched run against one question at a time, on the same questions."""
    same = sum(a == b for a, b in zip(batched["answers"], single["answers"], strict=False))
    first_b, first_s = batched["first"][:n_single], single["first"]
    top2 = first_s.topk(2, dim=-1).values
    flipped = (first_b.argmax(-1) != first_s.argmax(-1)).nonzero().squeeze(1).tolist()
    return {"identical_answers": f"{same}/{n_single}",
            "first_token_max_abs_logit_diff": round((first_b - first_s).abs().max().item(), 4),
            "first_token_argmax_differs": len(flipped),
            "top2_margin_where_it_differs": [round((top2[i, 0] - top2[i, 1]).item(), 4) for i in flipped],
            "top2_margin_median": round((top2[:, 0] - top2[:, 1]).median().item(), 4)}


def run_generation(model, processor, records, cfg: StageConfig, runs) -> dict:
    """generate_answers (curriculum/evaluation.py) for each (label, questions, batch, new tokens), timed: the whole
    call, and inside it the prefill and each decode step of model.generate; the rest is preparing inputs."""
    import torch

    from curriculum.evaluation import generate_answers

    out = {}
    for label, questions, bs, new_tokens in runs:
        calls, first_scores = [], []
        model.generate = timed_generate(model, calls, first_scores)
        try:
            sync()
            t = time.perf_counter()
            answers = generate_answers(model, processor, records[:questions], cfg, bs, new_tokens, progress=False)
            sync()
            total = time.perf_counter() - t
        finally:
            model.__dict__.pop("generate")
        steps = [b - a for times in calls for a, b in zip(times[1:-2], times[2:-1], strict=True)]
        in_generate = sum(times[-1] - times[0] for times in calls)
        out[label] = {"seconds": round(total, 2), "answers": answers, "first": torch.cat(first_scores),
                      "prefill_s": round(sum(times[1] - times[0] for times in calls), 3),
                      "decode_step_median_s": round(statistics.median(steps), 4) if steps else None,
                      "decode_steps": len(steps), "outside_generate_s": round(total - in_generate, 3)}
    return out


def generation_speed(model, processor, ckpt: str, train_file: Path, px: int, n: int,
                     profile_dir: Path | None = None) -> dict:
    """generate_answers (curriculum/evaluation.py) batched (the end-of-stage evaluation, 64 questions a batch) against
    one question at a time, with where the time goes (prefill, decode steps, preparing inputs outside generate);
    and, to see why answers differ, the first generated token's logits of both: where the argmax differs, how close
    the top two were (a random model's logits are flat, so bf16 rounding that differs with the batch shape can flip
    them)."""
    import torch

    from curriculum.evaluation import generate_answers

    cfg = stage_config(ckpt, train_file, px, 1, {})
    records = load_records(train_file)[:n]
    n_single = min(n, 16)  # one at a time costs the same per question at any n: time 16, compare per question
    batch = min(n, 64)
    runs = (("batched", n, batch, 8), ("one_at_a_time", n_single, 1, 8))
    out = run_generation(model, processor, records, cfg, runs)
    if profile_dir is not None:  # where the time of a batched generation goes
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            sync()
            t = time.perf_counter()
            generate_answers(model, processor, records[:batch], cfg, batch, 8, progress=False)
            sync()
            wall = time.perf_counter() - t
        (profile_dir / "profile_generation.txt").write_text(
            f"one batch of {batch}, 8 new tokens: {wall:.2f} s wall\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30) + "\n"
            + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    per_question = {label: out[label]["seconds"] / questions for label, questions, _, _ in runs}
    timing = {label: {k: v for k, v in out[label].items() if k not in ("answers", "first")} for label in out}
    return {"questions": n, "batch": batch, "batched_s": out["batched"]["seconds"],
            "one_at_a_time_questions": n_single, "one_at_a_time_s": out["one_at_a_time"]["seconds"],
            "speedup": round(per_question["one_at_a_time"] / per_question["batched"], 1), "timing": timing,
            **compare_answers(out["batched"], out["one_at_a_time"], n_single)}


def generation_identity_fp32(ckpt: str, train_file: Path, px: int, n: int) -> dict:
    """The same comparison with float32 compute: batched and one-at-a-time answers should then agree (what is
    left of the bf16 differences is rounding, not padding, masks or positions)."""
    import torch

    cfg = stage_config(ckpt, train_file, px, 1, {})
    cfg.quantization.compute_dtype = "float32"
    processor = load_processor(ckpt, cfg)
    processor.image_processor.size = {"shortest_edge": px * px, "longest_edge": px * px}
    model = tq.new_adapter(tq.load_quantized_base(ckpt, cfg), cfg.lora, cfg.seed)
    speed.fuse_lora_updates(model)
    records = load_records(train_file)[:n]
    out = run_generation(model, processor, records, cfg, (("batched", n, n, 8), ("one_at_a_time", n, 1, 8)))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"compute_dtype": "float32", "questions": n, **compare_answers(out["batched"], out["one_at_a_time"], n)}


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="/tmp/q8b")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="measured steps per variant (after the warm-up steps)")
    p.add_argument("--warmup", type=int, default=3, help="steps per variant before the measured ones")
    p.add_argument("--generation", type=int, default=32, help="questions for the generation comparison (0: skip)")
    p.add_argument("--generation-fp32", type=int, default=0,
                   help="questions for the same comparison with float32 compute, at the end (0: skip)")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds from the start after which no new variant starts (0: none)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the input pipeline's own rate")
    p.add_argument("--profile", nargs="*", default=[],
                   help="variants to profile (torch.profiler, two steps after the timed ones); generation: one batch")
    args = p.parse_args()
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warmup = args.warmup
    results = []
    data = {px: make_dataset(Path(f"/tmp/speed_data/W{px}"), px, 2000)
            for px in {448} | {VARIANTS[v][0] for v in args.variants}}
    measured = {px: {} for px in data}  # the plan's measurements, per image size (the model and samples are the same)
    by_upcast = {}
    for name in args.variants:
        px, keys = VARIANTS[name]
        by_upcast.setdefault(keys.get("fp32_upcast", False), []).append(name)
    for upcast, names in sorted(by_upcast.items()):
        first = VARIANTS[names[0]]
        cfg = stage_config(args.ckpt, data[first[0]], first[0], warmup + args.steps, dict(first[1]))
        processor = load_processor(args.ckpt, cfg)
        sync()
        t = time.perf_counter()
        # loaded without the fused kernels, which are patched in (for good) before the first variant that uses them
        model = tq.new_adapter(tq.load_quantized_base(args.ckpt, cfg), cfg.lora, cfg.seed)
        load_s = time.perf_counter() - t
        liger = None
        for name in sorted(names, key=lambda n: VARIANTS[n][1].get("liger_kernels") is not False):  # "off" first
            px, keys = VARIANTS[name]
            if args.deadline and time.time() - t_start > args.deadline:
                print(json.dumps({"variant": name, "skipped": f"past the deadline of {args.deadline:.0f} s"}))
                results.append({"variant": name, "image_px": px, "skipped": True})
                continue
            if keys.get("liger_kernels") is not False and liger is None:
                liger = apply_liger(model, processor, data[448], 448, stage_config(args.ckpt, data[px], px, 1, {}))
                print(json.dumps({"liger": liger}), flush=True)
                results.append({"variant": "liger-check", **liger})
            cfg = stage_config(args.ckpt, data[px], px, warmup + args.steps, dict(keys))
            processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
            try:
                r = run_variant(model, processor, name, px, cfg, warmup, load_s,
                                out if name in args.profile else None,
                                swiglu=keys.get("_swiglu", True) and keys.get("liger_kernels") is not False,
                                pipeline=not args.no_pipeline, measured=measured[px])
            except Exception as err:  # noqa: BLE001 - one variant's failure is its row; the others still run
                import traceback

                traceback.print_exc()
                r = {"variant": name, "image_px": px, "error": speed.first_line(err)[:200]}
            print(json.dumps(r), flush=True)
            results.append(r)
            json.dump({"gpu": gpu_name(), "results": results}, open(out / "speed.json", "w"),
                      indent=1)
        if not upcast and args.generation:
            processor.image_processor.size = {"shortest_edge": 448 * 448, "longest_edge": 448 * 448}
            g = generation_speed(model, processor, args.ckpt, data[448], 448, args.generation,
                                 out if "generation" in args.profile else None)
            print(json.dumps({"generation": g}), flush=True)
            results.append({"variant": "generation", **g})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if args.generation_fp32:
        g = generation_identity_fp32(args.ckpt, data[448], 448, args.generation_fp32)
        print(json.dumps({"generation_fp32": g}), flush=True)
        results.append({"variant": "generation-fp32", **g})
    json.dump({"gpu": gpu_name(), "results": results}, open(out / "speed.json", "w"), indent=1)


if __name__ == "__main__":
    main()
