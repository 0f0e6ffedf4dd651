"""Processes: one, or several started by `accelerate launch` (DDP or FSDP); the same code path for both.

The launcher tells each process who it is through the environment (RANK, LOCAL_RANK, WORLD_SIZE,
ACCELERATE_USE_FSDP). It is read once, into `runtime()`, and printed with the resolved config at start.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from curriculum.errors import ConfigError, CurriculumError


def cpu_threads_wait_passively() -> None:
    """Let torch's CPU threads (OpenMP) sleep while they wait for work instead of spinning, unless the user set
    OMP_WAIT_POLICY. Spinning threads take the cores that a dataloader worker, another process or the next operation
    needs: a demo stage on 2 cores took 85 s of CPU with one dataloader worker and 20 s with passive waiting, the same
    losses. Read by OpenMP when torch loads: call it before the first `import torch` (the scripts do, at import)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass(frozen=True)
class Runtime:
    """What the launcher and the machine give this process; fixed for its whole life."""

    rank: int  # 0 for the only process, or for the main one of those the launcher started
    local_rank: int  # this process's GPU on its machine
    world_size: int  # how many processes the launcher started (1 without a launcher)
    fsdp: bool  # launched with an FSDP accelerate config (accelerate tells its processes through the environment)
    gpu: bool  # torch sees a GPU
    omp_wait_policy: str = "unset"  # how torch's CPU threads wait for work (cpu_threads_wait_passively)

    @classmethod
    def from_environment(cls) -> Runtime:
        import torch

        return cls(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   world_size=int(os.environ.get("WORLD_SIZE", "1")),
                   fsdp=os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true",
                   gpu=torch.cuda.is_available(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))

    def __str__(self) -> str:
        return (f"Runtime: process {self.rank} of {self.world_size} (local rank {self.local_rank}), "
                f"FSDP {'on' if self.fsdp else 'off'}, GPU {'yes' if self.gpu else 'no'}, CPU threads wait "
                f"{'passively' if self.omp_wait_policy.upper() == 'PASSIVE' else 'spinning'} "
                f"(OMP_WAIT_POLICY={self.omp_wait_policy})")


@functools.cache
def runtime() -> Runtime:
    """The environment, read on first use and never again (the launcher sets it before the script runs)."""
    return Runtime.from_environment()


def is_main_process() -> bool:
    """True in the process that writes files and prints: the only one, or rank 0 of those the launcher started
    (the launcher sets RANK before the script runs, so this holds from the first line on)."""
    return runtime().rank == 0


def print_main(*args, **kwargs) -> None:
    """print, on the main process only: with N processes every line would otherwise appear N times."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def fsdp_enabled() -> bool:
    """Launched with an FSDP accelerate config."""
    return runtime().fsdp


def gpu_available() -> bool:
    return runtime().gpu


def processes():
    """accelerate's view of the processes: index, count, barriers. A single process is a world of one."""
    from accelerate import PartialState

    # cpu=True on a machine without a GPU: without it accelerate sees no processes to join there (as the Trainer
    # does with use_cpu)
    return PartialState(cpu=not runtime().gpu)


def gather_from_processes(item: Any) -> list:
    """`item` from every process, in process order, on every process (a one-item list with a single process)."""
    from accelerate.utils import gather_object

    return gather_object([item])


def check_processes_agree(views: list[dict], key: str, what: str, hint: str) -> None:
    """Every process must hold the same adapter. Raised on every process alike (they all see the same views),
    so none is left waiting for the others."""
    if len({v[key] for v in views}) > 1:
        held = ", ".join(f"process {v['process']}: {str(v[key])[:16]}" for v in views)
        raise CurriculumError(f"the processes hold different adapters ({what}: {held}). {hint}")


def training_device() -> Any:
    """This process's device: its own GPU under `accelerate launch` (LOCAL_RANK), else GPU 0, else the CPU."""
    return runtime().local_rank if runtime().gpu else "cpu"


def one_gpu_per_process(args, world: int) -> None:
    """One process sees several GPUs (a plain `python train_qlora_qwen3vl.py` on a machine with two): the Trainer
    would wrap the model in nn.DataParallel, which copies the whole 4-bit model to every GPU at every step, runs
    slower than one GPU and reports half the batch it trains. Train on this process's GPU; `accelerate launch`
    (configs/accelerate/ddp.yaml) is the way to use them all. The Trainer reads the count from `args._n_gpu`."""
    if world > 1 or args.n_gpu <= 1:
        return
    if not hasattr(args, "_n_gpu"):
        raise ConfigError(f"{args.n_gpu} GPUs are visible to one process and this transformers version would train "
                          "on them with nn.DataParallel; set CUDA_VISIBLE_DEVICES to one GPU, or use accelerate launch "
                          "--config_file configs/accelerate/ddp.yaml")
    print_main(f"{args.n_gpu} GPUs visible to one process: training on GPU {training_device()} only (not "
               "nn.DataParallel); to train on all of them: accelerate launch --config_file configs/accelerate/ddp.yaml "
               "train_qlora_qwen3vl.py ...")
    args._n_gpu = 1
