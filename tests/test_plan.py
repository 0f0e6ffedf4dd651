"""One effective batch, split any way into micro-batches and accumulation steps, is the same optimisation; and the
plan that chooses the split (with the checkpointed layers and the offload) for a memory budget.

The plan measures steps on the GPU; here its choice is tested on measurements given to it, and the training it
leads to on the tiny model on the CPU. Its speed is measured on the GPU by bench/speed.py, never here.
"""

import pytest
import torch
from conftest import REPO

import train_qlora_qwen3vl as tq
from curriculum import speed


def trained(tiny_model_path, processor, tmp_path, batch_size: int, grad_accum: int, steps: int = 3):
    """Losses logged at every optimizer step and the LoRA weights after `steps` steps of batch_size x grad_accum
    samples, on stage 2's records (answers of one to several tokens, so micro-batches hold different counts)."""
    fp32 = tq.QuantizationSettings(compute_dtype="float32")  # the CPU's arithmetic: differences are the split's
    cfg = tq.StageConfig(output_dir=str(tmp_path / "out"), train_file="unused", batch_size=batch_size,
                         grad_accum=grad_accum, max_steps=steps, lr=1e-2, warmup_ratio=0.0, logging_steps=1,
                         eval_steps=0, tensorboard=False, dataloader_num_workers=0, gradient_checkpointing=False,
                         quantization=fp32, lora=tq.LoraSettings(dropout=0.0))  # dropout masks follow the shapes
    records = tq.load_records(REPO / "data/stage2/train.jsonl")[:8 * steps]
    model = tq.new_adapter(tq.load_quantized_base(tiny_model_path, cfg), cfg.lora, cfg.seed)
    speed.fuse_lora_updates(model)
    trainer = tq.build_trainer(model, processor, tq.VQADataset(records, processor, cfg), None, cfg, tmp_path / "w")
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
