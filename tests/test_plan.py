"""One effective batch, split any way into micro-batches and accumulation steps, is the same optimisation; and the
plan that chooses the split (with the checkpointed layers and the offload) for a memory budget.

The plan measures steps on the GPU; here its choice is tested on measurements given to it, and the training it
leads to on the tiny model on the CPU. Its speed is measured on the GPU by bench/speed.py, never here.
"""

import json

import pytest
import torch
from conftest import REPO

import train_qlora_qwen3vl as tq
from curriculum import plan, speed
from curriculum.config import LoraSettings, QuantizationSettings, StageConfig, effective_batch_problems, load_config
from curriculum.data_files import load_records
from curriculum.errors import ConfigError
from curriculum.stage_folder import STAGE_METRICS


def trained(tiny_model_path, processor, tmp_path, batch_size: int, grad_accum: int, steps: int = 3):
    """Losses logged at every optimizer step and the LoRA weights after `steps` steps of batch_size x grad_accum
    samples, on stage 2's records (answers of one to several tokens, so micro-batches hold different counts)."""
    fp32 = QuantizationSettings(compute_dtype="float32")  # the CPU's arithmetic: differences are the split's
    cfg = StageConfig(output_dir=str(tmp_path / "out"), train_file="unused", batch_size=batch_size,
                      grad_accum=grad_accum, max_steps=steps, lr=1e-2, warmup_ratio=0.0, logging_steps=1,
                      eval_steps=0, tensorboard=False, dataloader_num_workers=0, gradient_checkpointing=False,
                      quantization=fp32, lora=LoraSettings(dropout=0.0))  # dropout masks follow the shapes
    records = load_records(REPO / "data/stage2/train.jsonl")[:8 * steps]
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    speed.fuse_lora_updates(model)
    dataset = tq.VQADataset(records, processor, cfg.min_pixels, cfg.max_pixels)
    patches = speed.plan_speed_patches(cfg)[0]  # answer-only logits on, as a stage trains
    trainer = tq.build_trainer(model, processor, dataset, None, cfg, tq.StepSize(batch_size, grad_accum), patches,
                               tmp_path / "w")
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.state.global_step, losses, {n: p.detach().clone() for n, p in model.named_parameters()
                                               if p.requires_grad}


def test_one_effective_batch_split_three_ways_is_the_same_optimisation(tiny_model_path, processor, tmp_path):
    """8 x 1, 4 x 2 and 2 x 4: the same optimizer steps, the same loss at every step and the same LoRA weights
    after them. The loss of a step is the mean over the answer tokens of all its micro-batches (not the mean of
    the micro-batches' means), as the Trainer counts them for AnswerOnlyLossTrainer."""
    runs = {split: trained(tiny_model_path, processor, tmp_path / f"{split[0]}x{split[1]}", *split)
            for split in ((8, 1), (4, 2), (2, 4))}
    steps, losses, weights = runs[(8, 1)]
    assert steps == 3 and len(losses) == 3
    for split, (other_steps, other_losses, other_weights) in runs.items():
        assert other_steps == steps, split
        assert other_losses == pytest.approx(losses, rel=1e-4), split
        for name, weight in weights.items():
            assert torch.allclose(other_weights[name], weight, rtol=1e-3, atol=1e-6), (split, name)


def test_the_answer_only_loss_steps_aside_when_the_trainer_no_longer_counts_the_step_s_tokens(monkeypatch):
    from transformers import Trainer

    def counting_elsewhere(self, batch_samples, device):  # a Trainer that decides the count by another flag
        return None

    monkeypatch.setattr(Trainer, "_get_num_items_in_batch", counting_elsewhere)
    assert "no longer counts the tokens of an accumulated step" in speed.answer_only_logits_problem()


# A GPU as the plan sees it, 8B-shaped at 448x448: 6 GiB of weights; per sample 1.4 GiB with no layer checkpointed,
# 0.12 GiB with every layer, 0.06 GiB with every layer offloaded; a recomputed layer costs 30% of its time, the
# offload 5%, and a micro-batch fills the GPU by about 8 samples.
GIB = 2**30
LAYERS = 36


def true_peak(micro: int, checkpointed: int, offload: bool, growth: float = 0.0) -> float:
    share = checkpointed / LAYERS
    per_sample = share * (0.06 if offload else 0.12) + (1 - share) * 1.4
    return (6 + micro * per_sample + growth * micro * micro) * GIB


def true_seconds(micro: int, checkpointed: int, offload: bool) -> float:
    return micro * 0.016 * (1 + 0.3 * checkpointed / LAYERS + 0.05 * offload) * (1 + 8 / micro)


def fake_gpu(growth: float = 0.0, bus: float = 0.0, in_flight: float = 0.0):
    """`bus`: seconds a streamed layer's copies add per sample (a slow bus: more than its recomputation saved);
    `in_flight`: GiB per sample and streamed layer that the copies still waiting to leave hold."""
    timed = []

    def measure_peak(mode: str, micro: int) -> float:
        return true_peak(micro, 0 if mode == "none" else LAYERS, mode == "offload", growth)

    def time_plan(plan) -> tuple[float, float]:
        timed.append(plan)
        args = (plan.micro_batch, plan.checkpointed, plan.offload)
        # a streamed layer keeps as little on the GPU as a checkpointed one, and does not recompute
        peak = true_peak(plan.micro_batch, plan.checkpointed + plan.streamed, plan.offload, growth)
        return (peak + in_flight * plan.micro_batch * plan.streamed * GIB,
                true_seconds(*args) + bus * plan.micro_batch * plan.streamed)

    return measure_peak, time_plan, timed


def best_by_brute_force(per_process: int, usable: float, growth: float = 0.0) -> float:
    rates = [m / true_seconds(m, k, o) for m in range(1, per_process + 1) if per_process % m == 0
             for k in range(LAYERS + 1) for o in (False, True) if (k or not o)
             and true_peak(m, k, o, growth) <= usable]
    return max(rates)


@pytest.mark.parametrize("budget_gib", [10.8, 12, 18, 40, 125])
def test_the_plan_is_the_fastest_that_fits_having_timed_a_few(budget_gib):
    measure_peak, time_plan, timed = fake_gpu()
    best, record = plan.choose_plan(64, LAYERS, budget_gib * GIB, measure_peak, time_plan)
    assert best.plan.micro_batch * best.plan.grad_accum == 64
    assert best.peak <= budget_gib * GIB
    assert best.samples_per_s >= 0.98 * best_by_brute_force(64, budget_gib * GIB)
    assert 1 <= len(timed) <= plan.MOST_TIMED_IN_ALL and len(set(timed)) == len(timed)
    assert record["timed"][0]["samples_per_s"] == round(best.samples_per_s, 2)


def test_the_plans_at_unsloth_s_memory_and_with_the_whole_card():
    measure_peak, time_plan, _ = fake_gpu()
    at_11 = plan.choose_plan(64, LAYERS, 10.8 * GIB, measure_peak, time_plan)[0].plan
    assert (at_11.micro_batch, at_11.checkpointed, at_11.offload) == (64, 36, True)
    whole_card = plan.choose_plan(64, LAYERS, 125 * GIB, measure_peak, time_plan)[0].plan
    assert whole_card == plan.Plan(64, 1, 0, LAYERS, False)  # nothing recomputed, one micro-batch


def test_a_candidate_measured_over_the_budget_is_dropped_for_the_next():
    """Memory that grows faster than the lines through the small probes: the largest candidates do not fit when
    measured; the plan takes one that does."""
    measure_peak, time_plan, _ = fake_gpu(growth=0.002)
    best, record = plan.choose_plan(64, LAYERS, 18 * GIB, measure_peak, time_plan)
    assert record["over_budget"] and best.peak <= 18 * GIB
    assert best.samples_per_s >= 0.9 * best_by_brute_force(64, 18 * GIB, growth=0.002)


def test_without_checkpointing_or_partial_checkpointing_the_plan_keeps_to_what_is_allowed():
    measure_peak, time_plan, _ = fake_gpu()
    no_checkpointing = plan.choose_plan(64, LAYERS, 40 * GIB, measure_peak, time_plan, checkpointing=False)[0].plan
    assert no_checkpointing.checkpointed == 0 and no_checkpointing.micro_batch == 16  # 6 + 16 x 1.4 <= 40
    all_or_none = plan.choose_plan(64, LAYERS, 18 * GIB, measure_peak, time_plan, partial=False, offload=False)[0]
    assert all_or_none.plan.checkpointed in (0, LAYERS) and not all_or_none.plan.offload


@pytest.mark.parametrize("budget_gib", [10.8, 18])
def test_with_streamed_layers_auto_the_plan_streams_where_the_bus_keeps_up(budget_gib):
    """The fastest plan is timed again with a third and two thirds of its checkpointed layers streamed, and the
    fastest of all is chosen: on a fast bus the most streamed, on a slow one none; the same plans without
    `stream`."""
    measure_peak, time_plan, timed = fake_gpu()
    without = plan.choose_plan(64, LAYERS, budget_gib * GIB, measure_peak, time_plan)[0].plan
    assert without.checkpointed >= 3 and not any(p.streamed for p in timed)
    k = without.checkpointed
    tried = [plan.Plan(without.micro_batch, without.grad_accum, k - s, LAYERS, without.offload, s)
             for s in (k // 3, 2 * k // 3)]

    fast_bus = fake_gpu(bus=0.0001)
    best, record = plan.choose_plan(64, LAYERS, budget_gib * GIB, *fast_bus[:2], stream=True)
    assert fast_bus[2][-2:] == tried and best.plan == tried[1]
    assert best.plan.checkpointed + best.plan.streamed == k  # the same layers keep their activations
    assert record["timed"][0]["streamed"] == 2 * k // 3 and len(record["timed"]) == len(fast_bus[2])

    slow_bus = fake_gpu(bus=0.01)
    best = plan.choose_plan(64, LAYERS, budget_gib * GIB, *slow_bus[:2], stream=True)[0]
    assert slow_bus[2][-2:] == tried and best.plan == without


def test_a_streamed_plan_over_the_budget_is_not_chosen():
    """The copies waiting to leave hold memory that the lines through the probes do not predict: measured over
    the budget, the streamed plan is recorded as such and the plan without streaming kept."""
    measure_peak, time_plan, _ = fake_gpu(bus=0.0001, in_flight=0.01)
    best, record = plan.choose_plan(64, LAYERS, 10.8 * GIB, measure_peak, time_plan, stream=True)
    k = best.plan.checkpointed
    assert not best.plan.streamed and k >= 3
    assert [p["streamed"] for p in record["over_budget"]] == [k // 3, 2 * k // 3]


def test_no_plan_fits_is_a_config_error_naming_the_budget():
    measure_peak, time_plan, _ = fake_gpu()
    with pytest.raises(ConfigError, match="memory_budget_gib: no plan for 64 samples .* fits in 5.0 GiB usable"):
        plan.choose_plan(64, LAYERS, 5 * GIB, measure_peak, time_plan)


def test_processes_that_planned_apart_take_what_fits_on_each():
    a, b = plan.Plan(64, 1, 30, LAYERS, False), plan.Plan(32, 2, 36, LAYERS, True)
    assert plan.combined([a, b]) == plan.Plan(32, 2, 36, LAYERS, True)
    assert plan.combined([a, a]) == a
    streamed = plan.Plan(32, 2, 20, LAYERS, False, streamed=12)  # 4 layers keep their activations
    assert plan.combined([streamed, a]) == plan.Plan(32, 2, 32, LAYERS, False)  # a's 6 would not fit
    assert plan.combined([streamed, plan.Plan(32, 2, 30, LAYERS, False, streamed=4)]) == \
        plan.Plan(32, 2, 30, LAYERS, False, streamed=4)  # 34 not kept, as on the second


def test_effective_batch_leaves_the_split_to_the_plan(tmp_path):
    cfg = load_config(REPO / "configs/demo/stage1.yaml", [f"output_dir={tmp_path}", "effective_batch=16",
                                                          "batch_size=auto"])
    tq.validate_config(cfg)  # on a CPU too: the plan then runs the whole step as one micro-batch
    for key, value in (("batch_size", "8"), ("grad_accum", "2"), ("checkpointed_layers", "0.5"),
                       ("offload_activations", "true")):
        with pytest.raises(ConfigError, match=f"{key}: {value} is chosen by the plan when effective_batch is set"):
            tq.validate_config(load_config(REPO / "configs/demo/stage1.yaml", [
                f"output_dir={tmp_path}", "effective_batch=16", "batch_size=auto", f"{key}={value}"]))
    assert effective_batch_problems(cfg, 3) == ["effective_batch (16) must be a multiple of the 3 processes "
                                                "(each takes an equal share of a step)"]


@pytest.mark.parametrize("streamed_layers", ["0", "auto"])
def test_a_stage_trains_with_the_plan_it_measured(tmp_path, tiny_model_path, monkeypatch, capsys, streamed_layers):
    """effective_batch through the whole stage, on the tiny model on the CPU, the GPU's measurements stood in for:
    every measured step sees the model set as the plan being measured; the chosen plan (4 x 2, both layers
    checkpointed and offloaded; with streamed_layers: auto the first of them streamed instead, which the stand-in
    times faster) is what the Trainer runs, what the log says and stage_metrics.json records."""
    from curriculum import batch_size, processes

    def as_set(model) -> tuple[int, bool, int]:
        layers = speed.language_layers(model)
        checkpointed = [layer for layer in layers if layer.gradient_checkpointing]
        return len(checkpointed), any(isinstance(layer._gradient_checkpointing_func, speed.OffloadedCheckpoint)
                                      for layer in checkpointed), \
            sum(getattr(layer.__dict__.get("forward"), "streamed", False) for layer in layers)

    def peak_as_set(model, dataset, size, cfg, collate, step_loss, encoded=None, timed_steps=0):
        checkpointed, offloaded, streamed = as_set(model)
        kept = checkpointed + streamed  # a streamed layer keeps as little on the GPU as a checkpointed one
        per_sample = [1.0, 0.6, 0.2][kept] if not offloaded else [1.0, 0.55, 0.1][kept]
        seconds = size * 0.01 * (1 + 0.3 * checkpointed / 2 + 0.05 * offloaded) * (1 + 8 / size)
        seen.append((size, checkpointed, offloaded, streamed))
        return (1 + per_sample * size) * GIB, seconds if timed_steps else None

    def build_trainer_recording(model, *args, **kwargs):
        trained_as.append(as_set(model))
        return build_trainer(model, *args, **kwargs)

    seen, trained_as, build_trainer = [], [], tq.build_trainer
    monkeypatch.setattr(tq, "build_trainer", build_trainer_recording)
    monkeypatch.setattr(processes, "gpu_available", lambda: True)  # read by plan_step at its call
    monkeypatch.setattr(batch_size, "measure_step", peak_as_set)
    monkeypatch.setattr(batch_size, "budget_gib", lambda cfg: 1.75 / batch_size.USABLE_SHARE)  # 1.75 GiB usable
    out = tmp_path / "stage1"
    code = tq.main(["configs/demo/stage1.yaml", "--set", f"output_dir={out}", "--set", "max_steps=2", "--set",
                    "batch_size=auto", "--set", "effective_batch=8", "--set", "eval_questions=0", "--set",
                    "gradient_checkpointing=true", "--set", "tensorboard=false", "--set",
                    f"streamed_layers={streamed_layers}"])
    assert code == 0
    log = capsys.readouterr().out
    streamed = int(streamed_layers == "auto")  # of the 2 checkpointed layers, 2 // 3 = 0 and 2 * 2 // 3 = 1 tried
    # 8 x 1 needs 1 + 8 x 0.1 = 1.8 GiB even offloaded; 4 x 2 fits offloaded (1.4) and checkpointed (1.8: no)
    assert (f"Plan: micro-batch 4 x 2 accumulation step(s), {2 - streamed}/2 decoder layers checkpointed, their "
            f"inputs in CPU memory{', 1 streamed to CPU memory' if streamed else ''}: ") in log, log
    assert "Effective batch size 8 = 4 per process x 1 process(es) x 2 accumulation step(s)" in log
    assert (4, 2, True, 0) in seen and all(size in (1, 2, 4, 8) for size, *_ in seen)
    assert ((4, 1, True, 1) in seen) == bool(streamed)
    assert trained_as == [(2 - streamed, True, streamed)]  # the model trains as planned, whatever was measured last
    metrics = json.loads((out / STAGE_METRICS).read_text())
    assert metrics["plan"]["chosen"] == {"micro_batch": 4, "grad_accum": 2, "checkpointed": 2 - streamed,
                                         "layers": 2, "offload": True, "streamed": streamed}
    assert metrics["effective_batch_size"] == 8 and metrics["grad_accum"] == 2 and metrics["global_steps"] == 2
    assert metrics["speed_patches"]["offload_activations"].startswith("on, by the plan")
