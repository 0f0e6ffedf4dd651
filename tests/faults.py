"""Test fixture, not product: the trainer with a fault injected.

    python tests/faults.py oom CONFIG.yaml [--set ...]   # the first training step runs out of GPU memory
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import transformers  # noqa: E402

import train_qlora_qwen3vl as tq  # noqa: E402


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by tests/faults.py)")


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault != "oom":
        raise SystemExit(f"unknown fault {fault!r}")
    transformers.Trainer.training_step = out_of_memory
    sys.exit(tq.main(argv))
