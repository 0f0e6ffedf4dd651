"""`batch_size: auto`: the largest batch whose measured training step fits the memory budget on this GPU.

The recipe passes in how it makes a batch and its loss (`collate`, `step_loss`), so that the step measured is
the step it trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from curriculum.config import StageConfig
from curriculum.errors import ConfigError
from curriculum.processes import gather_from_processes, gpu_available, print_main, processes


def batch_size_for_budget(peaks: dict[int, float], budget_bytes: float, step: int, most: int) -> int:
    """The largest multiple of `step` (at most `most`) whose peak memory, on the straight line through the two
    measured (batch size, peak bytes) points, is within the budget. Activations grow linearly with the batch;
    the weights are the fixed part. A step that ran out of memory measured infinity."""
    (b1, p1), (b2, p2) = sorted(peaks.items())
    if not p1 <= budget_bytes:
        needs = f"needs {p1 / 2**30:.1f} GiB at peak" if math.isfinite(p1) else "ran out of GPU memory"
        raise ConfigError(f"memory_budget_gib: a batch of {b1} already {needs}, over the budget "
                          f"({budget_bytes / 2**30:.1f} GiB usable); set batch_size to a smaller number, lower "
                          "max_pixels, or raise the budget")
    if not math.isfinite(p2):
        return b1
    per_sample = max((p2 - p1) / (b2 - b1), 1.0)
    fits = int((budget_bytes - (p1 - per_sample * b1)) // per_sample)
    return max(b1, min(fits // step * step, most))


def measure_step(model, dataset, size: int, cfg: StageConfig, collate: Callable[[list[dict]], dict],
                 step_loss: Callable, encoded: dict | None = None, timed_steps: int = 0) -> tuple[float, float | None]:
    """One training step at batch `size`, as the Trainer runs it (autocast to the compute dtype, the same loss), on
    the longest samples (repeated if there are fewer), so a real batch never needs more: its peak GPU memory
    (infinity if it ran out), and with `timed_steps`, the seconds of each of that many more steps (None without).
    `encoded` ({index: sample}) keeps the samples encoded from call to call: every batch starts with the same
    longest ones. `collate(samples)` makes the batch and `step_loss(model, batch)` its training loss, both as the
    recipe's Trainer does."""
    import time

    import torch

    encoded = {} if encoded is None else encoded
    lengths = dataset.lengths or [0] * len(dataset)
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
    device = next(p for p in model.parameters() if p.requires_grad).device
    model.train()
    picks = [order[i % len(order)] for i in range(size)]
    for i in picks:
        if i not in encoded:
            encoded[i] = dataset[i]
    batch = collate([encoded[i] for i in picks])
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds = None
    try:
        for step in range(1 + timed_steps):
            if step == 1:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=getattr(torch, cfg.quantization.compute_dtype)):
                loss = step_loss(model, batch)
            loss.backward()
            del loss
            model.zero_grad(set_to_none=True)
        if timed_steps:
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / timed_steps
        peak = torch.cuda.max_memory_allocated()
    except torch.cuda.OutOfMemoryError:
        peak, seconds = math.inf, None
    model.zero_grad(set_to_none=True)
    del batch
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak, seconds


def measure_step_memory(model, dataset, batch_sizes: list[int], cfg: StageConfig, collate: Callable[[list[dict]], dict],
                        step_loss: Callable, encoded: dict | None = None) -> dict[int, float]:
    """Peak GPU memory of one training step at each batch size (measure_step)."""
    encoded = {} if encoded is None else encoded
    return {size: measure_step(model, dataset, size, cfg, collate, step_loss, encoded)[0] for size in batch_sizes}


def budget_gib(cfg: StageConfig) -> float:
    """memory_budget_gib on this GPU: a number, at most the GPU's size (said in the log when cut); auto, what this
    process can have: the GPU's free memory and what its own allocator already holds (the model's weights)."""
    import torch

    device = torch.cuda.current_device()
    if cfg.memory_budget_gib == "auto":
        free, _ = torch.cuda.mem_get_info(device)
        budget = (free + torch.cuda.memory_reserved(device)) / 2**30
        print_main(f"memory_budget_gib: auto = {budget:.1f} GiB (free on this GPU, with what this process holds)")
        return budget
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    if gpu_gib < cfg.memory_budget_gib:
        print_main(f"memory_budget_gib={cfg.memory_budget_gib:g} is more than this GPU's {gpu_gib:.1f} GiB; using that")
    return min(cfg.memory_budget_gib, gpu_gib)


USABLE_SHARE = 0.9  # of the budget: headroom for the allocator's fragmentation and evaluation


AUTO_BATCH_STEP = 4  # batch_size: auto tries 4 and 8 and chooses a multiple of 4
MIN_STEPS_PER_EPOCH = 10  # batch_size: auto never makes an epoch shorter than this many optimizer steps


def auto_batch_limit(n_train: int, cfg: StageConfig, num_processes: int) -> int:
    """The largest batch_size: auto may choose on data of n_train samples: an epoch keeps at least
    MIN_STEPS_PER_EPOCH optimizer steps, because a small stage trained in two or three huge steps barely moves
    (and its warm-up and schedule lose their meaning)."""
    per_process = n_train // (num_processes * cfg.grad_accum * MIN_STEPS_PER_EPOCH)
    return max(AUTO_BATCH_STEP, per_process // AUTO_BATCH_STEP * AUTO_BATCH_STEP)


def next_batch_to_measure(peaks: dict[int, float], usable: float, limit: int) -> int | None:
    """The next batch size worth a measured step: on the line through the largest measured batch within the budget
    and the smallest over it (halfway after running out of memory), or through the two largest within it while
    none is over. None when that gains nothing over the largest batch already known to fit."""
    under = sorted(b for b, p in peaks.items() if p <= usable)
    over = sorted(b for b, p in peaks.items() if p > usable)
    lo = under[-1]
    if over and not math.isfinite(peaks[over[0]]):
        size = (lo + over[0]) // 2 // AUTO_BATCH_STEP * AUTO_BATCH_STEP
    elif over:
        size = batch_size_for_budget({lo: peaks[lo], over[0]: peaks[over[0]]}, usable, AUTO_BATCH_STEP,
                                     most=over[0] - AUTO_BATCH_STEP)
    else:
        size = batch_size_for_budget({b: peaks[b] for b in under[-2:]}, usable, AUTO_BATCH_STEP, most=10**6)
    size = min(size, limit)
    return size if size > lo else None


def choose_batch_size(model, dataset, cfg: StageConfig, collate: Callable[[list[dict]], dict],
                      step_loss: Callable) -> int:
    """batch_size: auto (see there). Every process measures its own GPU; all use the smallest choice, so they step
    together. `collate` and `step_loss` as in measure_step_memory."""
    if not gpu_available():
        raise ConfigError("batch_size: auto chooses the batch by measuring GPU memory, and there is no GPU; set "
                          "batch_size to a number")
    budget = budget_gib(cfg)
    usable = USABLE_SHARE * budget * 2**30
    limit = auto_batch_limit(len(dataset), cfg, processes().num_processes)
    encoded: dict = {}  # each longest sample is encoded once, however many batch sizes are measured
    peaks = measure_step_memory(model, dataset, [AUTO_BATCH_STEP, 2 * AUTO_BATCH_STEP], cfg, collate, step_loss,
                                encoded)
    fit = batch_size_for_budget(peaks, usable, AUTO_BATCH_STEP, most=10**6)  # also: the smallest must fit
    # The line is extrapolated from small batches, and activations can grow faster than it: measure the size it
    # gives, and go on between the largest batch that fitted and the smallest that did not.
    for _ in range(3):
        size = next_batch_to_measure(peaks, usable, limit)
        if size is None:
            break
        peaks |= measure_step_memory(model, dataset, [size], cfg, collate, step_loss, encoded)
    size = max(b for b, p in peaks.items() if p <= usable and b <= limit)
    chosen = min(gather_from_processes(size))
    measured = ", ".join(f"{p / 2**30:.1f} GiB at {b}" if math.isfinite(p) else f"out of memory at {b}"
                         for b, p in sorted(peaks.items()))
    capped = (f"; memory allows about {fit}, capped at {limit} so that an epoch keeps {MIN_STEPS_PER_EPOCH} "
              "optimizer steps" if fit > limit else "")
    print_main(f"Batch size {chosen} chosen (batch_size: auto, memory_budget_gib={budget:g}): a training step on the "
               f"longest samples measured {measured}{capped}")
    return chosen
