"""`effective_batch`: the fastest way to run an optimizer step of that many samples on this GPU, within the memory
budget, measured.

A plan splits the step into micro-batches (samples per forward and backward) and accumulation steps, and chooses
how many of the language model's decoder layers recompute their activations in the backward (gradient
checkpointing, evenly spread) and whether those layers keep their one saved input in CPU memory (activation
offload). Less recomputation, no offload and larger micro-batches are faster and take more memory; which of them
to spend the memory on is what the plan measures:

1. Peak memory of a training step on the longest samples, at two micro-batch sizes, with no layer checkpointed,
   with every layer, and with every layer offloaded. Activations grow linearly with the micro-batch, and each
   layer that does not recompute adds the same share, so straight lines through these give the peak of any
   (micro-batch, checkpointed layers, offload).
2. For each micro-batch that divides the step, the fewest checkpointed layers that fit, with and without offload;
   of these, the ones no other candidate beats on every count (larger micro-batch, fewer checkpointed layers, no
   offload), at most MOST_TIMED of them, each timed over TIMED_STEPS steps after one warm-up step. A candidate
   whose measured peak is over the budget is dropped; what it needed over its prediction is added to the
   predictions at its micro-batch and above, and the candidates are drawn again.
3. The fastest in samples/s. The optimizer step itself (a few LoRA tensors) is the same for every plan.
4. With `streamed_layers: auto`, the fastest is timed again with a third and with two thirds of its checkpointed
   layers streamed instead (curriculum/activation_streaming.py: their saved tensors in pinned CPU memory, not
   recomputed), and the fastest of all within the budget is chosen. Streaming trades recomputation for PCIe
   traffic, and whether the bus keeps up depends on the GPU, the micro-batch and the images: it is measured here,
   never predicted.

The trainer's Trainer gets the micro-batch as its batch size and the rest as gradient_accumulation_steps: its loss
is the mean over the answer tokens of the whole step (curriculum/answer_loss.py), so any plan is the same
optimisation. The measuring is done by the callables the recipe passes (curriculum/batch_size.measure_step);
`choose_plan` itself is pure, and tested on given measurements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from curriculum.config import StageConfig
from curriculum.errors import ConfigError

PROBE_SIZES = {"none": (1, 2), "all": (4, 8), "offload": (4, 8)}  # micro-batches measured for each memory line
MOST_TIMED = 4  # candidates timed before the first choice; a rejected one lets the next one in
MOST_TIMED_IN_ALL = 8
TIMED_STEPS = 2  # after one warm-up step


@dataclass(frozen=True, order=True)
class Plan:
    micro_batch: int
    grad_accum: int
    checkpointed: int  # decoder layers that recompute in the backward
    layers: int
    offload: bool
    streamed: int = 0  # the first decoder layers, whose saved tensors wait in CPU memory (not checkpointed)

    @property
    def checkpointed_fraction(self) -> float:
        return self.checkpointed / self.layers if self.layers else 0.0

    def describe(self) -> str:
        where = ", their inputs in CPU memory" if self.offload and self.checkpointed else ""
        streamed = f", {self.streamed} streamed to CPU memory" if self.streamed else ""
        return (f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation step(s), {self.checkpointed}/"
                f"{self.layers} decoder layers checkpointed{where}{streamed}")

    def short(self) -> str:
        return (f"{self.micro_batch}x{self.grad_accum} {self.checkpointed}/{self.layers}"
                f"{' offloaded' if self.offload else ''}{f' {self.streamed} streamed' if self.streamed else ''}")


@dataclass(frozen=True)
class Line:
    """Peak bytes of a step = fixed + per_sample x micro-batch."""

    fixed: float
    per_sample: float

    @staticmethod
    def through(peaks: dict[int, float]) -> Line | None:
        (b1, p1), (b2, p2) = sorted(peaks.items())
        if not (math.isfinite(p1) and math.isfinite(p2)):
            return None
        per_sample = max((p2 - p1) / (b2 - b1), 1.0)
        return Line(p1 - per_sample * b1, per_sample)


def predicted_peak(lines: dict[str, Line | None], micro_batch: int, checkpointed: int, layers: int,
                   offload: bool) -> float:
    """Peak bytes of a step: between the line with no layer checkpointed and the line with every layer
    checkpointed (offloaded or not), by the share of layers checkpointed. Infinite where a line it needs is
    unknown (its measured step ran out of memory)."""
    full = lines["offload" if offload else "all"] if checkpointed else None
    none = lines["none"] if checkpointed < layers else None
    if (checkpointed and full is None) or (checkpointed < layers and none is None):
        return math.inf
    share = checkpointed / layers
    fixed = max(line.fixed for line in (full, none) if line is not None)
    per_sample = (share * full.per_sample if full else 0.0) + ((1 - share) * none.per_sample if none else 0.0)
    return fixed + per_sample * micro_batch


def candidates(per_process: int, layers: int, usable: float, lines: dict[str, Line | None], partial: bool,
               offload: bool, checkpointing: bool, excess: Callable[[int], float] = lambda micro: 0.0) -> list[Plan]:
    """For each micro-batch dividing the step, the fewest checkpointed layers predicted to fit, without and with
    offload. `partial`: any count of checkpointed layers (else none or all); `checkpointing: False`: none.
    `excess(micro_batch)`: bytes that measured steps needed over their prediction, added to it."""
    counts = (range(layers + 1) if partial else (0, layers)) if checkpointing else (0,)
    found = []
    for micro in (m for m in range(1, per_process + 1) if per_process % m == 0):
        for off in (False, True) if offload and checkpointing else (False,):
            fits = [k for k in counts
                    if (k or not off) and predicted_peak(lines, micro, k, layers, off) + excess(micro) <= usable]
            if fits:
                found.append(Plan(micro, per_process // micro, min(fits), layers, off))
    return found


def beats_on_every_count(a: Plan, b: Plan) -> bool:
    return (a != b and a.micro_batch >= b.micro_batch and a.checkpointed <= b.checkpointed
            and a.offload <= b.offload)


def front(plans: list[Plan]) -> list[Plan]:
    """The plans that no other beats on every count."""
    return [p for p in plans if not any(beats_on_every_count(q, p) for q in plans)]


def streamed_variants(plan: Plan) -> list[Plan]:
    """The plan with a third and with two thirds of its checkpointed layers streamed instead: the same layers keep
    their activations on the GPU, so about the same memory, less recomputation, more PCIe traffic."""
    shares = sorted({plan.checkpointed // 3, 2 * plan.checkpointed // 3} - {0})
    return [dataclasses.replace(plan, checkpointed=plan.checkpointed - s, streamed=s) for s in shares]


def prior_rate(plan: Plan) -> float:
    """The order in which candidates are timed, before any is: a micro-batch fills the GPU by about 8 samples, a
    recomputed layer costs about a third of its forward and backward, the offload a little. Only an order; the
    choice is made on measured rates."""
    return plan.micro_batch / (plan.micro_batch + 8) / (1 + 0.35 * plan.checkpointed_fraction + 0.08 * plan.offload)


@dataclass
class Timed:
    plan: Plan
    peak: float  # bytes, measured
    seconds: float  # per micro-batch step, measured

    @property
    def samples_per_s(self) -> float:
        return self.plan.micro_batch / self.seconds


def choose_plan(per_process: int, layers: int, usable: float, measure_peak: Callable[[str, int], float],
                time_plan: Callable[[Plan], tuple[float, float]], partial: bool = True, offload: bool = True,
                checkpointing: bool = True, stream: bool = False) -> tuple[Timed, dict]:
    """The fastest plan for an optimizer step of `per_process` samples within `usable` bytes. `measure_peak(mode,
    micro_batch)`: the peak bytes of one step with no layer ("none"), every layer ("all") or every layer offloaded
    ("offload") checkpointed, infinite if it ran out of memory. `time_plan(plan)`: its (peak bytes, seconds per
    micro-batch step). `stream`: also time the fastest with some of its checkpointed layers streamed (step 4 of the
    module's docstring). Returns the chosen plan measured, and a record of what was measured (for the log and
    stage_metrics.json). Raises ConfigError when not even a micro-batch of 1 fits."""
    modes = ["none"] + (["all"] + ["offload"] * offload if checkpointing else [])
    probes = {mode: {m: measure_peak(mode, m) for m in PROBE_SIZES[mode]} for mode in modes}
    lines = {mode: Line.through(probes[mode]) if mode in probes else None for mode in ("none", "all", "offload")}
    timed: dict[Plan, Timed] = {}
    over: dict[Plan, float] = {}
    misses: dict[int, float] = {}  # micro-batch -> bytes a measured step needed over its prediction

    def excess(micro: int) -> float:
        return max([miss * micro / m for m, miss in misses.items() if m <= micro], default=0.0)

    while len(timed) + len(over) < MOST_TIMED_IN_ALL:
        pool = candidates(per_process, layers, usable, lines, partial, offload, checkpointing, excess)
        todo = [p for p in sorted(front([p for p in pool if p not in over]), key=prior_rate, reverse=True)
                [:MOST_TIMED] if p not in timed]
        if not todo:
            break
        for plan in todo[:MOST_TIMED_IN_ALL - len(timed) - len(over)]:
            peak, seconds = time_plan(plan)
            miss = peak - predicted_peak(lines, plan.micro_batch, plan.checkpointed, layers, plan.offload)
            misses[plan.micro_batch] = max(misses.get(plan.micro_batch, 0.0), miss)
            if peak <= usable:
                timed[plan] = Timed(plan, peak, seconds)
            else:
                over[plan] = peak
                break  # the predictions have changed: draw the candidates again
    if stream and timed:
        for plan in streamed_variants(max(timed.values(), key=lambda t: t.samples_per_s).plan):
            peak, seconds = time_plan(plan)
            if peak <= usable:
                timed[plan] = Timed(plan, peak, seconds)
            else:
                over[plan] = peak
    record = {"usable_gib": round(usable / 2**30, 2),
              "probes": {mode: {str(m): gib(p) for m, p in peaks.items()} for mode, peaks in probes.items()},
              "timed": [{**asdict(t.plan), "peak_gib": gib(t.peak), "samples_per_s": round(t.samples_per_s, 2)}
                        for t in sorted(timed.values(), key=lambda t: -t.samples_per_s)],
              "over_budget": [{**asdict(p), "peak_gib": gib(peak)} for p, peak in over.items()]}
    if not timed:
        smallest = min(min(peaks.values()) for peaks in probes.values())
        raise ConfigError(f"memory_budget_gib: no plan for {per_process} samples per optimizer step and process fits "
                          f"in {usable / 2**30:.1f} GiB usable (the smallest step measured {gib(smallest)} GiB); raise "
                          "memory_budget_gib, lower max_pixels, or lower effective_batch")
    return max(timed.values(), key=lambda t: t.samples_per_s), record


def gib(value: float) -> float | str:
    return round(value / 2**30, 2) if math.isfinite(value) else "out of memory"


def combined(plans: list[Plan]) -> Plan:
    """One plan for processes that measured their own GPUs (they must step together): the smallest micro-batch,
    and with it the fewest layers that neither recompute nor stream, the fewest streamed, and the offload if any
    used it, which fits wherever one of them did."""
    micro = min(p.micro_batch for p in plans)
    streamed = min(p.streamed for p in plans)
    return Plan(micro, plans[0].micro_batch * plans[0].grad_accum // micro,
                max(p.checkpointed + p.streamed for p in plans) - streamed, plans[0].layers,
                any(p.offload for p in plans), streamed)


def apply_plan(model, plan: Plan) -> None:
    """Set the model's decoder layers as the plan says (checkpointed, offloaded, streamed)."""
    from curriculum import speed

    speed.set_checkpointed_layers(model, plan.checkpointed, plan.offload, streamed=plan.streamed)


def plan_step(model, dataset, cfg: StageConfig, collate: Callable[[list[dict]], dict], step_loss: Callable,
              measured: dict | None = None) -> tuple[Plan, dict]:
    """effective_batch: choose the plan (choose_plan) by measuring steps of the model on the longest samples of
    `dataset`, as the Trainer runs them (`collate`, `step_loss`: see batch_size.measure_step), leave the model set
    to it, log it (`Plan: ...`) and return it with the record of what was measured. Without a GPU there is nothing
    to measure: the whole step is one micro-batch, checkpointed as gradient_checkpointing and checkpointed_layers
    say. `measured` (bench/speed.py): measurements kept across calls on the same model and samples."""
    from curriculum import batch_size, speed
    from curriculum.processes import gather_from_processes, gpu_available, print_main, processes

    world = processes().num_processes
    per_process = cfg.effective_batch // world
    layers = len(speed.language_layers(model))
    if not gpu_available():
        plan = Plan(per_process, 1, speed.apply_gradient_checkpointing(model, cfg)[0], layers, False)
        print_main(f"Plan: {plan.describe()} (effective_batch {cfg.effective_batch}; no GPU to measure plans on)")
        return plan, {"measured": False, "chosen": asdict(plan)}
    measured = {} if measured is None else measured
    encoded = measured.setdefault("encoded", {})
    usable = batch_size.USABLE_SHARE * batch_size.budget_gib(cfg) * 2**30
    offload_why = speed.offload_problem()
    partial_why = speed.partial_checkpointing_problem()
    stream_why = speed.streaming_problem(model) if cfg.streamed_layers == "auto" else None
    for why, what in ((offload_why, "offload the activations"), (partial_why, "checkpoint a part of the layers"),
                      (stream_why, "stream layers")):
        if why:
            print_main(f"Plan: will not {what}: {why}")

    def measure_peak(mode: str, micro: int) -> float:
        if ("peak", mode, micro) not in measured:
            speed.set_checkpointed_layers(model, layers if mode != "none" else 0, offload=mode == "offload")
            measured["peak", mode, micro] = batch_size.measure_step(model, dataset, micro, cfg, collate, step_loss,
                                                                    encoded)[0]
        return measured["peak", mode, micro]

    def time_plan(plan: Plan) -> tuple[float, float]:
        key = ("timed", plan.micro_batch, plan.checkpointed, plan.offload, plan.streamed)
        if key not in measured:
            apply_plan(model, plan)
            peak, seconds = batch_size.measure_step(model, dataset, plan.micro_batch, cfg, collate, step_loss,
                                                    encoded, timed_steps=TIMED_STEPS)
            measured[key] = (peak, seconds if seconds is not None else math.inf)
        return measured[key]

    best, record = choose_plan(per_process, layers, usable, measure_peak, time_plan, partial=partial_why is None,
                               offload=offload_why is None, checkpointing=cfg.gradient_checkpointing,
                               stream=cfg.streamed_layers == "auto" and stream_why is None)
    plans = [Plan(**p) for p in gather_from_processes(asdict(best.plan))]
    plan = combined(plans)
    apply_plan(model, plan)
    others = ", ".join(f"{Plan(**{k: v for k, v in t.items() if k in Plan.__dataclass_fields__}).short()}: "
                       f"{t['samples_per_s']:g}" for t in record["timed"][1:])
    print_main(f"Plan: {plan.describe()}: {best.samples_per_s:.1f} samples/s measured at {gib(best.peak)} GiB peak "
               f"(effective_batch {cfg.effective_batch}, {record['usable_gib']:g} GiB usable of memory_budget_gib "
               f"{cfg.memory_budget_gib}){'; also timed: ' + others if others else ''}"
               + (f"; the processes' own plans differed: {', '.join(p.describe() for p in plans)}" if plan != best.plan
           else ""))
    record |= {"chosen": asdict(plan), "samples_per_s": round(best.samples_per_s, 2), "peak_gib": gib(best.peak)}
    return plan, record
