"""The fast training path computes the same loss and gradients as the plain one, on the tiny model on the CPU.

Fast: no fp32 up-cast, logits only at the answer positions, gradient checkpointing on half the layers.
Plain: peft's prepare_model_for_kbit_training (fp32 up-cast) and the model's own loss over full logits.
Speed itself is measured on the GPU by bench/speed.py, never here.
"""

import math
import os
import types
from collections import Counter

import pytest
import torch
from conftest import REPO

import train_qlora_qwen3vl as tq
from curriculum import batch_size, processes, speed
from curriculum.answer_loss import answer_loss, answer_only_loss, answer_positions
from curriculum.config import QuantizationSettings, StageConfig, load_config
from curriculum.data_files import load_records
from curriculum.errors import ConfigError
from curriculum.records import with_image_settings


def test_answer_positions_pick_the_tokens_before_each_trained_label():
    labels = torch.tensor([[-100, -100, 5, 6, -100],
                           [-100, -100, -100, 7, 8]])
    keep, targets = answer_positions(labels)
    assert keep.tolist() == [1, 2, 3]  # position t predicts label t+1
    assert targets.tolist() == [[5, 6, -100], [-100, 7, 8]]


def test_answer_loss_matches_the_full_logits_loss_with_and_without_a_token_count():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8]])
    keep, targets = answer_positions(labels)
    for n in (None, torch.tensor(9)):
        expected = ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=n)
        assert torch.allclose(answer_loss(logits[:, keep], targets, n), expected, atol=1e-6)


def batch(processor, n=3):
    recs = load_records(REPO / "data/stage2/train.jsonl")[:n]
    examples = [tq.encode_example(processor, r, 4096, 50176) for r in recs]
    return tq.collate_batch(examples, processor.tokenizer.pad_token_id)


def loss_and_grads(tiny_model_path, adapter, inputs, **settings):
    cfg = StageConfig(output_dir="o", train_file="t", **settings)
    model = tq.continue_adapter(tq.load_quantized_base(tiny_model_path, cfg), adapter)
    if cfg.fused_lora_forward is not False:
        speed.fuse_lora_updates(model)
    model.train()
    torch.manual_seed(0)  # the same LoRA dropout masks in both runs
    if cfg.answer_only_logits is not False:
        loss, _ = answer_only_loss(model, inputs)
    else:
        loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def trained_adapter(curriculum):
    root, _ = curriculum
    return str(root / "stage1")  # nonzero LoRA A and B, so every LoRA gradient is nonzero


def test_answer_only_logits_give_the_same_loss_and_gradients(tiny_model_path, processor, trained_adapter):
    inputs = batch(processor)
    assert inputs["attention_mask"].eq(0).any()  # rows of different lengths: padding is covered
    full = loss_and_grads(tiny_model_path, trained_adapter, inputs, answer_only_logits=False)
    fast = loss_and_grads(tiny_model_path, trained_adapter, inputs, answer_only_logits=True)
    assert fast[0] == pytest.approx(full[0], rel=1e-5)
    for name, grad in full[1].items():
        assert torch.allclose(fast[1][name], grad, rtol=1e-3, atol=1e-6), name


def test_fast_path_matches_the_plain_path_within_bf16_tolerance(tiny_model_path, processor, trained_adapter):
    inputs = batch(processor)
    plain = loss_and_grads(tiny_model_path, trained_adapter, inputs, fp32_upcast=True, answer_only_logits=False)
    fast = loss_and_grads(tiny_model_path, trained_adapter, inputs, fp32_upcast=False, answer_only_logits=True,
                          checkpointed_layers=0.5)
    assert fast[0] == pytest.approx(plain[0], rel=2e-2)  # bf16 norms and embeddings instead of fp32 copies
    cosines = [torch.nn.functional.cosine_similarity(fast[1][n].flatten(), g.flatten(), dim=0).item()
               for n, g in plain[1].items()]
    assert min(cosines) > 0.98, min(cosines)


def new_adapter_loss_and_grads(tiny_model_path, inputs, patch=None) -> tuple[float, dict]:
    """Loss and LoRA gradients of a new adapter with a nonzero B (as after training: every LoRA gradient nonzero),
    in fp32, dropout drawn from seed 0; `patch(model)` applied first."""
    cfg = StageConfig(output_dir="o", train_file="t", quantization=QuantizationSettings(compute_dtype="float32"))
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    if patch is not None:
        patch(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    speed.fuse_lora_updates(model)
    model.train()
    torch.manual_seed(0)
    loss, _ = answer_only_loss(model, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_mrope_positions_from_the_dataloader_give_the_forward_s_own_loss_and_gradients(tiny_model_path, processor):
    """positions_in_dataloader: transformers' get_rope_index run in the collate, on the CPU, gives the positions the
    forward computes itself (rows of different lengths, right-padded, an image in each), so the same loss and
    gradients."""
    from transformers import AutoConfig

    records = load_records(REPO / "data/stage2/train.jsonl")[:3]
    examples = [tq.encode_example(processor, r, 4096, 50176) for r in records]
    positions = speed.MRopePositions(AutoConfig.from_pretrained(tiny_model_path))
    own = tq.collate_batch(examples, processor.tokenizer.pad_token_id)
    given = tq.collate_batch(examples, processor.tokenizer.pad_token_id, positions)
    assert own["attention_mask"].eq(0).any() and "position_ids" not in own
    assert given["position_ids"].shape == (3, *own["input_ids"].shape)
    assert not torch.equal(given["position_ids"][1], given["position_ids"][2])  # image tokens: 2-D positions
    loss, grads = new_adapter_loss_and_grads(tiny_model_path, own)
    given_loss, given_grads = new_adapter_loss_and_grads(tiny_model_path, given)
    assert given_loss == pytest.approx(loss, rel=1e-6)
    assert given_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(given_grads[name], grad, rtol=1e-5, atol=1e-7), name
    text_only = [{k: v for k, v in e.items() if k not in ("pixel_values", "image_grid_thw")} for e in examples]
    assert "position_ids" not in tq.collate_batch(text_only, 0, positions)  # the forward's own arange then


def left_padded(batch: dict, pad_token_id: int) -> dict:
    """The same rows padded on the left instead of the right (ids, labels, masks)."""
    out = dict(batch)
    fills = {"input_ids": pad_token_id, "labels": -100, "mm_token_type_ids": 0, "attention_mask": 0}
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for key, fill in fills.items():
        rows = [torch.cat([torch.full((batch[key].shape[1] - n,), fill, dtype=batch[key].dtype), row[:n]])
                for row, n in zip(batch[key], lengths, strict=True)]
        out[key] = torch.stack(rows)
    return out


def test_dropping_the_padding_mask_gives_the_same_loss_and_gradients(tiny_model_path, processor):
    """drop_padding_mask: rows of different lengths, right-padded, an image in each. Without the mask the text model
    attends causally alone, and no real token can see the padding after it: the loss and every LoRA gradient are
    the masked batch's, with the positions from the dataloader and with the forward's own."""
    from transformers import AutoConfig

    records = load_records(REPO / "data/stage2/train.jsonl")[:3]
    examples = [tq.encode_example(processor, r, 4096, 50176) for r in records]
    pad = processor.tokenizer.pad_token_id
    for positions in (speed.MRopePositions(AutoConfig.from_pretrained(tiny_model_path)), None):
        masked = tq.collate_batch(examples, pad, positions)
        unmasked = tq.collate_batch(examples, pad, positions, padding_mask=False)
        assert masked["attention_mask"].eq(0).any() and "attention_mask" not in unmasked
        loss, grads = new_adapter_loss_and_grads(tiny_model_path, masked)
        unmasked_loss, unmasked_grads = new_adapter_loss_and_grads(tiny_model_path, unmasked)
        assert unmasked_loss == pytest.approx(loss, rel=1e-5)
        assert unmasked_grads.keys() == grads.keys() and len(grads) > 0
        for name, grad in grads.items():
            assert torch.allclose(unmasked_grads[name], grad, rtol=1e-4, atol=1e-6), name
    # what makes it exact is the side of the padding: the same rows padded on the left need their mask
    left = left_padded(tq.collate_batch(examples, pad), pad)
    with_mask, _ = new_adapter_loss_and_grads(tiny_model_path, left)
    without_mask, _ = new_adapter_loss_and_grads(tiny_model_path, {k: v for k, v in left.items()
                                                                   if k != "attention_mask"})
    print(f"left-padded: {with_mask} with the mask, {without_mask} without")
    assert abs(without_mask - with_mask) > 5e-3 * abs(with_mask)


def test_deepstack_by_index_gives_the_boolean_mask_s_loss_and_gradients(tiny_model_path, processor):
    """deepstack_by_index: the tiny model adds deepstack features in its first layers; added by index they give the
    same loss and LoRA gradients (rows of different lengths, an image in each)."""
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_path).vision_config.deepstack_visual_indexes  # it has deepstack
    inputs = batch(processor)
    loss, grads = new_adapter_loss_and_grads(tiny_model_path, inputs)
    bound = []
    patched_loss, patched_grads = new_adapter_loss_and_grads(
        tiny_model_path, inputs, lambda model: bound.append(speed.add_deepstack_by_index(model)))
    assert bound == [1]
    assert patched_loss == pytest.approx(loss, rel=1e-6)
    assert patched_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(patched_grads[name], grad, rtol=1e-5, atol=1e-7), name


def vision_output(model, inputs, autocast: bool):
    """The vision tower's output on the batch's images, and whether autocast was on inside its blocks."""
    seen = []
    visual = model.model.visual
    hook = visual.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        hook.remove()
    return out.pooler_output, seen


def test_the_vision_tower_runs_without_autocast_as_at_inference(tiny_model_path, processor):
    """vision_without_autocast: under the Trainer's autocast the vision tower computes exactly as it does without
    autocast (at inference), and autocast is off inside it; unpatched, autocast is on inside it. (On a GPU,
    autocast runs its LayerNorms in float32, which is what the patch avoids; the CPU's autocast does not, so here
    the outputs are the same either way and the test reads the switch.)"""
    cfg = StageConfig(output_dir="o", train_file="t")
    model = tq.load_quantized_base(tiny_model_path, cfg)
    inputs = batch(processor)
    plain, seen = vision_output(model, inputs, autocast=False)
    _, seen_under_autocast = vision_output(model, inputs, autocast=True)
    assert seen == [False] and seen_under_autocast == [True]
    assert speed.run_vision_tower_without_autocast(model) is None
    patched, seen = vision_output(model, inputs, autocast=True)
    assert seen == [False]
    assert torch.equal(torch.cat(patched), torch.cat(plain))
    # a vision tower that trains keeps autocast
    other = tq.load_quantized_base(tiny_model_path, cfg)
    next(p for p in other.model.visual.parameters() if p.is_floating_point()).requires_grad_(True)
    assert "LoRA trains modules of the vision tower" in speed.run_vision_tower_without_autocast(other)
    _, seen = vision_output(other, inputs, autocast=True)
    assert seen == [True]


def test_with_fp32_upcast_the_vision_tower_keeps_autocast(tmp_path):
    decisions, problems = speed.plan_speed_patches(load_config(REPO / "configs/demo/stage1.yaml",
                                                               [f"output_dir={tmp_path}", "fp32_upcast=true"]))
    assert problems == [] and not decisions["vision_without_autocast"].on
    assert "fp32_upcast: true" in decisions["vision_without_autocast"].note
    decisions, _ = speed.plan_speed_patches(load_config(REPO / "configs/demo/stage1.yaml", [f"output_dir={tmp_path}"]))
    assert decisions["vision_without_autocast"].on


def test_fused_lora_forward_gives_peft_s_loss_and_gradients(tiny_model_path, processor, trained_adapter):
    inputs = batch(processor)
    fp32 = QuantizationSettings(compute_dtype="float32")
    peft_own = loss_and_grads(tiny_model_path, trained_adapter, inputs, fused_lora_forward=False, quantization=fp32)
    fused = loss_and_grads(tiny_model_path, trained_adapter, inputs, fused_lora_forward=True, quantization=fp32)
    assert fused[0] == pytest.approx(peft_own[0], rel=1e-5)
    assert fused[1].keys() == peft_own[1].keys() and len(fused[1]) > 0
    for name, grad in peft_own[1].items():
        assert torch.allclose(fused[1][name], grad, rtol=1e-4, atol=1e-6), name


def test_fused_lora_forward_in_bf16_is_peft_s_to_bf16_rounding(tiny_model_path, processor, trained_adapter):
    inputs = batch(processor)  # bf16 compute without autocast: peft sums the update in fp32, the fused GEMM in bf16
    peft_own = loss_and_grads(tiny_model_path, trained_adapter, inputs, fused_lora_forward=False)
    fused = loss_and_grads(tiny_model_path, trained_adapter, inputs, fused_lora_forward=True)
    assert fused[0] == pytest.approx(peft_own[0], rel=1e-2)
    cosines = [torch.nn.functional.cosine_similarity(fused[1][n].flatten(), g.flatten(), dim=0).item()
               for n, g in peft_own[1].items()]
    assert min(cosines) > 0.99, min(cosines)


def test_the_fused_lora_forward_takes_the_dropout_kernel_s_product_where_it_applies(tiny_model_path, processor):
    """fused_lora_dropout's wiring: under autocast, in training, each fused LoRA layer asks its `lora_down_kernel`
    for lora_A(dropout(x)) and uses what it returns (here zeros: the LoRA update vanishes and the loss is the base
    model's); where the kernel returns None (it does not apply) the layer computes it with torch."""
    cfg = StageConfig(output_dir="o", train_file="t")
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    fused = speed.fuse_lora_updates(model)
    inputs = batch(processor)
    calls = []

    def loss_with(kernel) -> float:
        for module in model.modules():
            if "forward" in module.__dict__:
                module.lora_down_kernel = kernel
        model.train()
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return answer_only_loss(model, inputs)[0].item()

    torch_own = loss_with(None)
    assert speed.bind_lora_dropout_kernel(model) == fused > 0
    declined = loss_with(lambda x, weight, p: calls.append((x.shape[-1], weight.shape, p)))
    zeros = loss_with(lambda x, weight, p: torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype))
    with model.disable_adapter():
        base = loss_with(None)
    assert len(calls) == fused and {c[2] for c in calls} == {cfg.lora.dropout}
    assert declined == torch_own != base
    assert zeros == pytest.approx(base, rel=1e-3)


def test_the_dropout_kernel_is_off_with_the_fused_lora_forward(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "gpu_available", lambda: True)  # past "no GPU"
    stage = REPO / "configs/demo/stage1.yaml"
    decisions, _ = speed.plan_speed_patches(load_config(stage, [f"output_dir={tmp_path}"]))
    assert decisions["fused_lora_dropout"].on
    decisions, _ = speed.plan_speed_patches(load_config(stage, [f"output_dir={tmp_path}", "fused_lora_forward=false"]))
    assert decisions["fused_lora_dropout"].note == "off: it runs inside the fused LoRA forward, which is off"


def test_the_dropout_kernel_s_check_passes_it_and_catches_a_wrong_product_or_mask():
    """check_lora_dropout_kernel, run before the first step on the GPU, in Triton's interpreter here (it is chosen
    when triton is imported, hence a fresh Python): the kernel passes; a product 10% off, or a mask other than the
    one the kernel drew, is reported."""
    import subprocess
    import sys

    body = f"""
import sys; sys.path.insert(0, {str(REPO)!r})
import torch
from curriculum import lora_dropout, speed
cpu = torch.device("cpu")
print("kernel:", speed.check_lora_dropout_kernel(cpu))
own = lora_dropout.lora_down_with_dropout
lora_dropout.lora_down_with_dropout = lambda x, w, p: own(x, w, p) * 1.1
print("scaled:", speed.check_lora_dropout_kernel(cpu))
lora_dropout.lora_down_with_dropout = own
own_mask = lora_dropout.dropout_keep_mask
lora_dropout.dropout_keep_mask = lambda seed, T, K, p, device: own_mask(seed + 1, T, K, p, device)
print("other mask:", speed.check_lora_dropout_kernel(cpu))
"""
    done = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert found["kernel"] == "None"
    assert found["scaled"].startswith("its h differs from torch's with the same mask"), found
    assert found["other mask"].startswith("its h differs from torch's with the same mask"), found


def test_fused_lora_forward_is_bound_to_every_4bit_lora_layer_and_leaves_the_rest_to_peft(tiny_model_path,
                                                                                         trained_adapter):
    from peft.tuners.lora.bnb import Linear4bit

    cfg = StageConfig(output_dir="o", train_file="t", quantization=QuantizationSettings(compute_dtype="float32"))
    model = tq.continue_adapter(tq.load_quantized_base(tiny_model_path, cfg), trained_adapter)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    decoder_layers = model.get_base_model().model.language_model.layers
    assert speed.fuse_lora_updates(model) == len(layers) == 4 * len(decoder_layers)  # q, k, v, o
    assert all(m.forward.__func__ is speed.fused_lora_4bit_forward for m in layers)
    layer, x = layers[0], torch.randn(2, 3, layers[0].in_features)
    model.eval()
    with torch.no_grad():
        base = layer.base_layer(x)
        with_update = layer(x)
        assert not torch.allclose(with_update, base)  # the trained adapter changes the output ...
        with model.disable_adapter():  # ... and peft's own forward runs when the adapter is off
            assert torch.equal(layer(x), base)


def test_checkpointed_layers_choose_an_even_spread(tiny_model_path):
    cfg = StageConfig(output_dir="o", train_file="t", checkpointed_layers=0.5)
    model = tq.load_quantized_base(tiny_model_path, cfg)
    flags = [layer.gradient_checkpointing for layer in model.model.language_model.layers]
    assert sum(flags) == round(len(flags) / 2) and flags[0]
    cfg.checkpointed_layers = 0.0
    assert speed.apply_gradient_checkpointing(model, cfg) == (0, 0)
    assert not any(layer.gradient_checkpointing for layer in model.model.language_model.layers)
    cfg.gradient_checkpointing = False
    assert speed.apply_gradient_checkpointing(model, cfg) == (0, 0)


def test_streamed_layers_are_the_first_and_the_others_checkpoint_as_set(tiny_model_path):
    cfg = StageConfig(output_dir="o", train_file="t", streamed_layers=0.5)
    model = tq.load_quantized_base(tiny_model_path, cfg)
    layers = model.model.language_model.layers
    assert [getattr(layer.__dict__.get("forward"), "streamed", False) for layer in layers] == [True, False]
    assert [layer.gradient_checkpointing for layer in layers] == [False, True]  # checkpointed_layers 1.0 of the rest
    cfg.streamed_layers, cfg.checkpointed_layers = 1.0, 1.0
    assert speed.apply_gradient_checkpointing(model, cfg) == (0, 2)
    assert not any(layer.gradient_checkpointing for layer in layers)
    cfg.streamed_layers = 0.0
    assert speed.apply_gradient_checkpointing(model, cfg) == (2, 0)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_batch_size_for_budget_fits_the_line_through_two_measured_steps():
    gib = 2**30
    peaks = {8: 7 * gib, 16: 9 * gib}  # 5 GiB of weights, then 0.25 GiB per sample
    assert batch_size.batch_size_for_budget(peaks, 20 * gib, 8, most=10_000) == 56  # 5 + 60 x 0.25 = 20 -> 60 -> 56
    assert batch_size.batch_size_for_budget(peaks, 20 * gib, 8, most=40) == 40  # never more than the data
    assert batch_size.batch_size_for_budget(peaks, 8 * gib, 8, most=10_000) == 8  # 12 fit: rounded down to a multiple
    with pytest.raises(ConfigError, match="a batch of 8 already needs 7.0 GiB"):
        batch_size.batch_size_for_budget(peaks, 6 * gib, 8, most=10_000)


def test_a_batch_that_ran_out_of_memory_is_over_any_budget():
    gib = 2**30
    assert batch_size.batch_size_for_budget({4: 9 * gib, 8: math.inf}, 20 * gib, 4, most=10_000) == 4
    with pytest.raises(ConfigError, match="a batch of 4 already ran out of GPU memory"):
        batch_size.batch_size_for_budget({4: math.inf, 8: math.inf}, 20 * gib, 4, most=10_000)


def test_auto_batch_keeps_ten_optimizer_steps_per_epoch():
    cfg = StageConfig(output_dir="x", train_file="x", grad_accum=2)
    assert batch_size.auto_batch_limit(10_000, cfg, 1) == 500  # 10000 / (2 x 10)
    assert batch_size.auto_batch_limit(10_000, cfg, 4) == 124  # 125 per process, a multiple of 4
    assert batch_size.auto_batch_limit(200, cfg, 1) == 8  # 10, rounded down
    assert batch_size.auto_batch_limit(20, cfg, 1) == 4  # never below the smallest batch tried


def test_batch_size_auto_checks_the_extrapolated_batch(monkeypatch):
    """Activation memory that grows faster than the line through 4 and 8 samples: the size the line gives is over
    the budget when measured, so a smaller one, measured or between two measured points, is chosen."""
    gib = 2**30

    def peak(b: int) -> float:  # 5 GiB of weights; 0.1 GiB per sample, plus a little that grows with b^2
        return 5 * gib + 0.1 * gib * b + 0.002 * gib * b * b

    measured = []

    def fake_measure(model, dataset, sizes, cfg, collate, step_loss, encoded=None):
        measured.extend(sizes)
        return {b: (math.inf if peak(b) > 40 * gib else peak(b)) for b in sizes}

    monkeypatch.setattr(batch_size, "measure_step_memory", fake_measure)
    on_a_gpu = processes.Runtime(rank=0, local_rank=0, world_size=1, fsdp=False, gpu=True)
    monkeypatch.setattr(processes, "runtime", lambda: on_a_gpu)  # never the cached one, read under the stand-in
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=80 * gib))
    cfg = StageConfig(output_dir="x", train_file="x", memory_budget_gib=20)
    chosen = batch_size.choose_batch_size(None, [None] * 100_000, cfg, None, None)
    assert measured[:2] == [4, 8] and 3 <= len(measured) <= 5  # the extrapolated size was measured
    assert peak(chosen) <= 0.9 * 20 * gib and chosen % 4 == 0
    assert peak(chosen + 8) > 0.9 * 20 * gib  # and not far below what fits
    # data for 200 samples: an epoch keeps 10 steps
    assert batch_size.choose_batch_size(None, [None] * 200, cfg, None, None) == 20
    # a budget over the GPU's memory is cut to it
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=12 * gib))
    assert peak(batch_size.choose_batch_size(None, [None] * 100_000, cfg, None, None)) <= 0.9 * 12 * gib


def test_batch_size_auto_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path}", "batch_size=auto"])
    with pytest.raises(ConfigError, match="batch_size: auto measures GPU memory.*set batch_size to a number"):
        tq.validate_config(cfg)
    with pytest.raises(ConfigError, match="there is no GPU"):
        batch_size.choose_batch_size(None, None, cfg, None, None)
    with pytest.raises(ConfigError, match="--set batch_size=big: expected int, got str 'big'; or 'big' is not one "
                                             "of 'auto'"):
        load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path}", "batch_size=big"])


def test_liger_kernels_are_used_only_where_they_can_run(tiny_model_path, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path}"])
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    decisions = speed.apply_speed_patches(model, cfg, say=lambda line: None)  # auto, on a CPU: off, saying why
    assert cfg.liger_kernels == "auto" and decisions["liger_kernels"].note.startswith("off: no GPU")
    assert type(model.get_base_model().model.language_model.norm).__name__ == "Qwen3VLTextRMSNorm"
    forced = load_config("configs/demo/stage1.yaml", [f"output_dir={tmp_path}", "liger_kernels=true"])
    with pytest.raises(ConfigError, match="liger_kernels: true, but Liger kernels .* cannot run here: no GPU"):
        tq.validate_config(forced)


@pytest.mark.parametrize("sizes", [[(64, 64), (64, 64), (64, 64)], [(64, 64), (96, 64), (64, 64), (128, 128)]])
def test_batched_vision_attention_gives_the_vision_tower_s_own_output(tiny_model_path, processor, sizes):
    import numpy as np
    from PIL import Image

    fp32 = QuantizationSettings(compute_dtype="float32")
    cfg = StageConfig(output_dir="o", train_file="t", quantization=fp32, batched_vision_attention=False)
    model = tq.load_quantized_base(tiny_model_path, cfg)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    enc = processor.image_processor(images=images, return_tensors="pt")
    lengths = enc["image_grid_thw"].prod(-1).tolist()
    assert len(set(lengths)) == (1 if len(set(sizes)) == 1 else 3)  # one size, or three (two images share one)
    model.eval()
    with torch.no_grad():
        own = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        assert speed.batch_vision_attention(model) == len(
            model.model.visual.blocks)
        batched = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
    pairs = [(own.pooler_output, batched.pooler_output),
             *zip(own.deepstack_features, batched.deepstack_features, strict=True)]
    for a, b in pairs:
        a, b = (torch.cat(t) if isinstance(t, (list, tuple)) else t for t in (a, b))
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_batched_generation_answers_as_one_question_at_a_time(tiny_model_path, processor, trained_adapter):
    """Left padding, the attention mask and the multimodal positions of a padded batch must not change an answer, nor
    the logits behind it (in fp32, where the batch shape changes no rounding that matters; bench/speed.py measures
    bf16 on the GPU)."""
    from curriculum.evaluation import generate_answers

    records = load_records(REPO / "data/stage2/train.jsonl")[:6]
    prompts = [processor.apply_chat_template(with_image_settings(r.prompt_messages, r.image, 4096, 50176),
                                             add_generation_prompt=True) for r in records]
    assert len({len(p) for p in prompts}) > 1  # prompts of different lengths: the batch is padded
    cfg = StageConfig(output_dir="o", train_file="t", max_pixels=50176,
                      quantization=QuantizationSettings(compute_dtype="float32"))
    model = tq.continue_adapter(tq.load_quantized_base(tiny_model_path, cfg), trained_adapter)
    speed.fuse_lora_updates(model)
    generate, scores = model.generate, []

    def generate_keeping_scores(*args, **kwargs):  # every step's logits, (steps, batch, vocab)
        out = generate(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores))
        return out.sequences

    model.generate = generate_keeping_scores
    batched = generate_answers(model, processor, records, cfg, 6, 4, progress=False)
    batched_scores = scores.pop()
    one_at_a_time = generate_answers(model, processor, records, cfg, 1, 4, progress=False)
    assert batched == one_at_a_time
    assert torch.allclose(batched_scores, torch.cat(scores, dim=1), atol=1e-3), \
        (batched_scores - torch.cat(scores, dim=1)).abs().max()


def test_offloaded_checkpointing_gives_the_same_loss_and_gradients(tiny_model_path, processor):
    """The layer inputs kept in CPU memory and the layer recomputed from them: the same numbers as torch's own
    checkpointing, LoRA dropout included (the recomputation replays the forward's random state)."""
    inputs = batch(processor)
    fp32 = QuantizationSettings(compute_dtype="float32")
    runs = {}
    for offload in (False, True):
        cfg = StageConfig(output_dir="o", train_file="t", quantization=fp32, fused_lora_forward=False)
        model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
        with torch.no_grad():  # a nonzero B, as after training, so that every LoRA gradient is nonzero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        assert any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # masks to replay
        layers = model.get_base_model().model.language_model.layers
        calls = []
        if offload:
            assert speed.offload_checkpointed_activations(model) == len(layers)
            offloaded = layers[0]._gradient_checkpointing_func
            layers[0]._gradient_checkpointing_func = lambda *a, f=offloaded, c=calls: c.append(1) or f(*a)
        model.train()
        torch.manual_seed(0)
        loss, _ = answer_only_loss(model, inputs)
        loss.backward()
        runs[offload] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert calls == ([1] if offload else [])
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    assert runs[True][1].keys() == runs[False][1].keys() and len(runs[False][1]) > 0
    for name, grad in runs[False][1].items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(runs[True][1][name], grad, rtol=1e-4, atol=1e-7), name


def recorded(streaming) -> list[tuple]:
    """(what, layer index, what it returned or took) for every pack, unpack and prefetch of `streaming` from now on,
    until the instance's methods are deleted (back to the class's)."""
    events = []
    pack, unpack, prefetch = streaming.pack, streaming.unpack, streaming.prefetch_below

    def recorded_pack(layer, tensor):
        packed = pack(layer, tensor)
        events.append(("pack", layer.index, packed))
        return packed

    def recorded_unpack(layer, packed):
        events.append(("unpack", layer.index, packed))
        return unpack(layer, packed)

    def recorded_prefetch(index, grad):
        events.append(("prefetch", index, None))
        return prefetch(index, grad)

    streaming.pack, streaming.unpack, streaming.prefetch_below = recorded_pack, recorded_unpack, recorded_prefetch
    return events


def test_streamed_layers_give_the_same_loss_and_gradients(tiny_model_path, processor, monkeypatch):
    """Layers whose saved tensors go to CPU memory and come back (curriculum/activation_streaming.py, here a copy in
    the same memory, with every tensor counted as worth it): the same loss and LoRA gradients as keeping them, alone
    and beside a checkpointed layer; every tensor copied out comes back once; the layer above a streamed one starts
    its copy back before its backward needs it; and nothing is left held after the backward."""
    from curriculum import activation_streaming

    monkeypatch.setattr(activation_streaming, "MIN_BYTES", 0)
    inputs = batch(processor)
    fp32 = QuantizationSettings(compute_dtype="float32")
    cfg = StageConfig(output_dir="o", train_file="t", quantization=fp32)
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    with torch.no_grad():  # a nonzero B, as after training, so that every LoRA gradient is nonzero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    speed.fuse_lora_updates(model)
    model.train()
    layers = speed.language_layers(model)
    assert len(layers) == 2
    runs = {}
    for checkpointed, streamed in ((0, 0), (0, 1), (0, 2), (1, 1)):
        speed.set_checkpointed_layers(model, checkpointed, streamed=streamed)
        streaming = model._streamed_activations
        events = recorded(streaming)
        model.zero_grad()
        torch.manual_seed(0)
        loss, _ = answer_only_loss(model, inputs)
        loss.backward()
        runs[checkpointed, streamed] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.requires_grad}
        copied = [(i, p) for kind, i, p in events if kind == "pack" and isinstance(p, activation_streaming.Packed)]
        back = [(i, p) for kind, i, p in events if kind == "unpack" and isinstance(p, activation_streaming.Packed)]
        assert {i for i, _ in copied} == set(range(streamed))  # the first layers, and only they
        assert Counter(id(p) for _, p in back) == Counter(id(p) for _, p in copied)  # each save came back once
        assert not streamed or len({id(p) for _, p in copied}) < len(copied)  # a tensor saved twice, copied once
        assert streaming.saved == {}  # nothing held after the backward
        if streamed == 2:  # layer 1's output gradient announces layer 0's backward, before it unpacks anything
            order = [(kind, i) for kind, i, _ in events]
            assert order.index(("prefetch", 0)) < order.index(("unpack", 0))
        del streaming.pack, streaming.unpack, streaming.prefetch_below
    speed.set_checkpointed_layers(model, 0)
    assert "forward" not in layers[0].__dict__  # set anew: the layer's own forward back
    reference_loss, reference = runs[0, 0]
    for key, (loss, grads) in runs.items():
        assert loss == pytest.approx(reference_loss, rel=1e-6), key
        for name, grad in reference.items():
            assert grad.abs().sum() > 0, name
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), (key, name)


def test_the_streaming_check_passes_it_and_catches_a_wrong_copy(monkeypatch):
    """check_streaming runs before the first step on a GPU with streamed_layers set: it passes the real thing (here
    on the CPU) and names what differs when a copy comes back other than it left."""
    from curriculum import activation_streaming

    device = torch.device("cpu")
    assert activation_streaming.check_streaming(device) is None
    unpack = activation_streaming.StreamedActivations.unpack

    def stale(self, layer, packed):  # as if the copy back were read before it had landed
        out = unpack(self, layer, packed)
        return torch.zeros_like(out) if isinstance(packed, activation_streaming.Packed) else out

    monkeypatch.setattr(activation_streaming.StreamedActivations, "unpack", stale)
    why = activation_streaming.check_streaming(device)
    assert why is not None and "differs with the layers streamed" in why
