"""A stage's training step in one place: the Trainer that runs it, and everything of ours that runs in it, in order.

    dataloader worker      collate_batch (the recipe's): pad, concatenate the images' patches; the M-RoPE position
                           ids (speed.MRopePositions, with positions_in_dataloader)
    forward                Qwen3-VL with the speed patches bound to it once the adapter is on
                           (speed.apply_speed_patches, one `Speed patch <name>: on|off ...` line each): Liger's RoPE,
                           RMSNorm and SwiGLU, the batched vision attention, the fused LoRA forward of each 4-bit
                           layer, checkpointed (and offloaded) decoder layers
    loss                   AnswerOnlyLossTrainer.compute_loss: the vocabulary logits at the answer tokens only
                           (answer_only_logits); else the Trainer's own, the model's loss
    backward, clipping, AdamW, the schedule: the Trainer's own
    on_train_begin         WatchEarlierStages (their dev losses before the first step), MeasureBeforeFirstStep
                           (first_eval_loss, on the split the previous stage ended on)
    on_step_end            StopOnSignalOrDivergence (faults.StageGuard), WatchEarlierStages (at the last step)
    on_log                 StepLogLine (`step N/M | loss | lr | dt | mem`), the progress bar, TensorBoard
    on_evaluate            WatchEarlierStages (with the stage's own evaluation, every eval_steps)

The recipe's build_trainer makes the Trainer and adds these callbacks in this order (the Trainer calls callbacks in
the order they were added). What each callback decides is its owner's (faults.py, forgetting.py, the recipe); here
they are only wired to the Trainer's events.

transformers and torch are imported at the top: the recipe imports this module when it builds the Trainer (the model
has loaded by then), so its `--check` and config errors never wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import ProgressCallback

from curriculum.answer_loss import answer_only_loss
from curriculum.faults import StageGuard
from curriculum.forgetting import EarlierStagesWatch


class AnswerOnlyLossTrainer(Trainer):
    """The Trainer with its loss taken through answer_only_loss (answer_only_logits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss divides by the answer tokens of the whole optimizer step (every micro-batch of the
        # accumulation, every process), so that any split of one effective batch is the same optimisation. The
        # Trainer counts them, and takes the loss as already scaled for accumulation, only for a model that
        # "accepts loss kwargs", which Qwen3-VL declares it does not (its own loss would ignore the count):
        # without this, each micro-batch's mean is divided by the accumulation steps, and micro-batches with
        # fewer answer tokens weigh more. curriculum/speed.py checks that the Trainer still reads this flag.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = answer_only_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss: the count spans processes
        return (loss, outputs) if return_outputs else loss


class StepLogLine(TrainerCallback):
    """One fixed-format, greppable line per logging interval: `step N/M | loss | lr | dt | mem`."""

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
    """The Trainer's progress bar, without its dict of numbers at every log (StepLogLine prints those)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def tensorboard(output_dir: str) -> TensorBoardCallback:
    """TensorBoard logs in <output_dir's parent>/tensorboard/<stage folder name>: one folder per stage, side by side
    (`tensorboard --logdir <curriculum>/tensorboard`)."""
    from torch.utils.tensorboard import SummaryWriter

    out = Path(output_dir)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out.parent / "tensorboard" / out.name)))


class StopOnSignalOrDivergence(TrainerCallback):
    """After every optimizer step, before any save: faults.StageGuard's decision (a stop signal: save, then stop;
    non-finite LoRA weights: stop without saving)."""

    def __init__(self, guard: StageGuard):
        self.guard = guard

    def on_step_end(self, args, state, control, **kwargs):
        self.guard.after_step(state, control)


class WatchEarlierStages(TrainerCallback):
    """The earlier stages' dev losses (forgetting.EarlierStagesWatch), measured through `evaluate` (the Trainer's
    own evaluate): before the first step, with each evaluation of the stage's own split, and at the last step."""

    def __init__(self, watch: EarlierStagesWatch, evaluate: Callable[..., dict]):
        self.watch, self.evaluate = watch, evaluate

    def on_train_begin(self, args, state, control, **kwargs):
        self.watch.before_first_step(self.evaluate)  # after the Trainer wrapped the model (MeasureBeforeFirstStep)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # The stage's own evaluation every eval_steps reports `eval_loss`; the others (first_eval_..., final_eval_...,
        # and the watch's own: eval_stage1_loss, ...) do not, so this never calls itself.
        if metrics and "eval_loss" in metrics:
            self.watch.at_evaluation(state, control, self.evaluate)

    def on_step_end(self, args, state, control, **kwargs):
        self.watch.after_step(state, control, self.evaluate)


class MeasureBeforeFirstStep(TrainerCallback):
    """Runs `measure()` once training begins: after the Trainer has wrapped the model for training, before the first
    step. Evaluating before `trainer.train()` instead makes accelerate mark the model as prepared (for evaluation,
    without DDP), and train() then skips the DDP wrap: every process silently trains its own copy on its own shard
    of the data (accelerate 1.15; check_trained_adapter_on_every_process caught it)."""

    def __init__(self, measure: Callable[[], None]):
        self.measure = measure

    def on_train_begin(self, args, state, control, **kwargs):
        self.measure()
