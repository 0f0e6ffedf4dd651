"""The Trainer callbacks of a stage: one fixed-format log line per interval, the progress bar without its dict of
numbers, the measurement before the first step, and TensorBoard.

transformers and torch are imported when a callback is made (the Trainer is being built anyway), not when the recipe
imports this module: its `--check` and config errors do not wait for them.
"""

from __future__ import annotations

import time
from pathlib import Path

from tqdm.auto import tqdm


def make_log_callbacks():
    """One fixed-format, greppable line per logging interval: `step N/M | loss | lr | dt | mem`."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import ProgressCallback

    class StepLog(TrainerCallback):
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
        """The Trainer's progress bar, without its dict of numbers at every log (StepLog prints those)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    return StepLog(), ProgressBarOnly()


def before_first_step(measure):
    """A callback that runs `measure()` once training begins: after the Trainer has wrapped the model for
    training, before the first step. Evaluating before `trainer.train()` instead makes accelerate mark the model
    as prepared (for evaluation, without DDP), and train() then skips the DDP wrap: every process silently trains
    its own copy on its own shard of the data (accelerate 1.15; check_trained_adapter_on_every_process caught it)."""
    from transformers import TrainerCallback

    class BeforeFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            measure()

    return BeforeFirstStep()


def tensorboard_callback(output_dir: str):
    """TensorBoard logs in <output_dir's parent>/tensorboard/<stage folder name>: one folder per stage, side by side
    (`tensorboard --logdir <curriculum>/tensorboard`)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    out = Path(output_dir)
    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out.parent / "tensorboard" / out.name)))
