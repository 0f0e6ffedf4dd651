"""Faults a stage survives: a stop signal (a checkpoint first, then the same command resumes), a diverged loss,
a full disk, dataloader workers caught in the signal or left behind at exit."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from curriculum.errors import ConfigError, CurriculumError, DiskFull, StageStopped
from curriculum.processes import print_main
from curriculum.stage_folder import STAGE_METRICS

STAGE_START = "stage_start.json"  # in <output_dir>.partial: what a resumed run must not measure again
# Keys a resumed run may change: they decide what happens around the training, not what trains (forgetting_action:
# stop says to resume with forgetting_action: warn, or a higher tolerance, to accept the rise it stopped for).
NOT_COMPARED_ON_RESUME = ("overwrite", "forgetting_tolerance", "forgetting_action")


def dataloader_workers_follow_the_trainer() -> None:
    """Set once in the training process, before its dataloaders start workers (the recipe's fit), for every worker
    process forked from it from then on:
    - a worker holds SIGINT and SIGTERM blocked. Ctrl-C in a terminal, and torchrun or a cluster scheduler passing on
      SIGTERM, signal the whole process group; a worker that dies of it crashes the training step before StageGuard
      can save its checkpoint. The training process alone decides to stop, and ends its workers itself. (Blocked, not
      ignored: torch's worker loop installs its own SIGTERM handler after the fork; a blocked signal is never
      delivered, whatever handler it has.)
    - at exit, the workers still running are killed. They never take SIGTERM, so after a crash multiprocessing's own
      exit handler, which terminates them and then waits for them, would wait forever. Registered after
      multiprocessing's handler, so it runs before it.
    (Not in the dataset: a dataset holds data, and is also read outside training.)"""
    import atexit
    import multiprocessing.util  # registers its exit handler now if not yet, so that ours runs first

    global _workers_follow_the_trainer
    if _workers_follow_the_trainer:
        return
    os.register_at_fork(after_in_child=_block_stop_signals)
    atexit.register(lambda: [child.kill() for child in multiprocessing.active_children()])
    _workers_follow_the_trainer = True


def _block_stop_signals() -> None:
    """In a forked child of the training process (a dataloader worker; os.register_at_fork above)."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


_workers_follow_the_trainer = False  # per process


STOP_SIGNALS = ("SIGINT", "SIGTERM")  # what StageGuard stops for, saving a checkpoint first


class StageGuard:
    """Stops the stage cleanly: on SIGINT/SIGTERM after saving a checkpoint to resume from; on non-finite LoRA
    weights (a diverged loss) without saving them. Checked after every optimizer step, before any save."""

    def __init__(self, model):
        import signal

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.signal_name: str | None = None  # the stop signal this process received
        self.stop_signal: str | None = None  # the one the stage stopped for, on whichever process it arrived
        self.non_finite_step: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        import signal

        if self.signal_name:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print_main(f"\nReceived {self.signal_name}: saving a checkpoint after this step, then stopping "
                   "(send it again to stop at once)")

    def after_step(self, state, control) -> None:
        """After an optimizer step (the Trainer's on_step_end; step.StopOnSignalOrDivergence): stop on a signal
        (saving a checkpoint first) or on non-finite LoRA weights (without saving them), through the Trainer's
        `control`. Every process decides on the same flags, so all stop after the same step: a signal reaches the
        processes at slightly different points of their steps, and one that stopped a step earlier than the others
        would leave them waiting in the next step's gradient exchange. One device sync per step (and, with several
        processes, one tiny all-reduce)."""
        import torch

        device = self.params[0].device if self.params else "cpu"
        # the largest |weight| of each tensor, in a few multi-tensor kernels (not two launches per tensor, which the
        # host needs ~5 ms for at 288 LoRA tensors while the GPU waits): NaN or inf exactly when a weight is
        non_finite = (~torch.stack(torch._foreach_norm(self.params, float("inf"))).isfinite().all() if self.params
                      else torch.zeros((), dtype=torch.bool, device=device))
        received = STOP_SIGNALS.index(self.signal_name) + 1 if self.signal_name else 0
        # torch.full, not torch.tensor(value, device=...): a fill kernel instead of a copy the host waits for
        flags = torch.stack([non_finite.float(), torch.full((), float(received), device=device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        non_finite, received = flags.tolist()
        if non_finite:
            self.non_finite_step = state.global_step
            control.should_save, control.should_training_stop = False, True
        elif received:
            self.stop_signal = STOP_SIGNALS[int(received) - 1]
            control.should_save, control.should_training_stop = True, True

    def raise_if_stopped(self, trainer, work_dir: Path, lr: float) -> None:
        """After training: a diverged loss (nothing is saved as the stage) or a stop signal (a checkpoint was saved
        to resume from) ends the stage here, saying what to do."""
        if self.non_finite_step is not None:
            done = complete_checkpoints(work_dir)
            last = done[-1] if done else None
            raise CurriculumError(
                f"the LoRA weights became non-finite (NaN/inf) at step {self.non_finite_step}: the loss diverged. "
                f"Nothing was saved as the stage. Lower lr (now {lr:g}) or max_grad_norm; "
                + (f"the last good checkpoint is {last} (the same command resumes from it)." if last
                   else "no earlier checkpoint exists (set save_steps to keep some)."))
        stop_signal = self.stop_signal or self.signal_name  # or one that came after the last step
        if stop_signal:
            code = 130 if stop_signal == "SIGINT" else 143
            raise StageStopped(f"stopped by {stop_signal} at step {trainer.state.global_step}/"
                               f"{trainer.state.max_steps}; checkpoint saved in {work_dir}. Run the same command to "
                               "resume.", code)


def complete_checkpoints(work_dir: Path, remove_cut_short: bool = False) -> list[Path]:
    """`checkpoint-N` folders the Trainer finished writing, oldest first. It writes trainer_state.json last, so a
    folder without a readable one was cut short (a kill or a full disk mid-save) and must not be resumed from;
    with `remove_cut_short` such folders are deleted (freeing their space)."""
    done = []
    for ckpt in sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            done.append(ckpt)
        except (OSError, ValueError):
            if remove_cut_short:
                print_main(f"Removing {ckpt}: it was not completely written")
                shutil.rmtree(ckpt, ignore_errors=True)
    return done


def interrupted_run(work_dir: Path, config: dict) -> str | None:
    """The last checkpoint of an interrupted run of this very stage config (`config`, as resolved_config.yaml
    holds it), to resume from; None to start anew."""
    if not work_dir.is_dir():
        return None
    done = complete_checkpoints(work_dir)  # cut-short ones are removed below, once this run is known to resume
    start_file = work_dir / STAGE_START
    if not done or not start_file.is_file():
        shutil.rmtree(work_dir)  # started, but nothing to resume from: no checkpoint was written
        return None
    saved = json.loads(start_file.read_text())["config"]
    differ = [k for k in config if k not in NOT_COMPARED_ON_RESUME and saved.get(k) != config[k]]
    if differ:
        raise ConfigError(f"{work_dir} holds an interrupted run of this stage with other settings "
                          f"({', '.join(differ)}); restore them to resume it, or delete {work_dir} to start over")
    complete_checkpoints(work_dir, remove_cut_short=True)
    return str(done[-1])


def is_disk_full(err: BaseException, path: Path) -> bool:
    """True if `err` came from a full disk. torch.save reports it only as 'unexpected pos', so a write error on
    a disk with under 1 MiB free counts too."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err) or "os error 28" in str(err):
        return True
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < 1 << 20


def disk_full_error(writing: str, work_dir: Path, output_dir: str, previous_stage: str | None) -> DiskFull:
    """Clear what was cut short (freeing its space) and say what is intact (the stage continued, `previous_stage`, an
    old stage in `output_dir`, the checkpoints) and how to go on."""
    staging = Path(f"{output_dir}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    done = complete_checkpoints(work_dir, remove_cut_short=True)
    intact = [d for d in (previous_stage, output_dir) if d and (Path(d) / STAGE_METRICS).is_file()]
    resume = (f"it resumes from {done[-1]}" if done else "it starts the stage over (no checkpoint was complete; "
              "save_steps keeps some)")
    return DiskFull(f"no space left on device while writing {writing}. The partial files were removed; "
                    f"{', '.join(intact + [str(p) for p in done]) or 'nothing saved before'} "
                    f"{'is' if len(intact) + len(done) == 1 else 'are'} intact. Free space on that disk and run the "
                    f"same command: {resume}.")


@contextlib.contextmanager
def disk_full_stops_the_stage(writing: str, path: Path, work_dir: Path, output_dir: str, previous_stage: str | None):
    """A full disk while writing `writing` (under `path`) becomes DiskFull (exit 4), with what is intact and how to
    go on (disk_full_error); any other error passes through as it is."""
    try:
        yield
    except Exception as err:
        if is_disk_full(err, path):
            raise disk_full_error(writing, work_dir, output_dir, previous_stage) from err
        raise
