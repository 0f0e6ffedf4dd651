"""Test fixture, not product: the trainer with a fault injected.

    python tests/faults.py oom CONFIG.yaml [--set ...]                 # the first training step runs out of GPU memory
    python tests/faults.py fill-disk-at-step N CONFIG.yaml [--set ...]  # after step N, fill the output disk
    python tests/faults.py empty-adapter-save CONFIG.yaml [--set ...]   # the save writes an adapter with no tensors
    accelerate launch ... tests/faults.py last-process-reads DIR CONFIG.yaml [--set ...]
        # the last process continues the adapter in DIR instead of prev_checkpoint (a stale copy on one machine)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import transformers  # noqa: E402

import train_qlora_qwen3vl as tq  # noqa: E402


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by tests/faults.py)")


def fill_disk_after(step: int):
    """A callback that, after optimizer step `step`, fills the disk of the output directory with a file named
    `filler` beside it (the test deletes it to 'free space')."""

    class FillDisk(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step != step:
                return
            filler = Path(args.output_dir).parent / "filler"
            with open(filler, "ab", buffering=0) as f:
                for chunk in (1 << 16, 1 << 12, 1):  # down to the last byte
                    try:
                        while True:
                            f.write(b"\0" * chunk)
                    except OSError:
                        pass
            print(f"faults.py: filled the disk after step {step}", flush=True)

    return FillDisk()


if __name__ == "__main__":
    fault, argv = sys.argv[1], sys.argv[2:]
    if fault == "oom":
        transformers.Trainer.training_step = out_of_memory
    elif fault == "fill-disk-at-step":
        at, argv = int(argv[0]), argv[1:]
        build = tq.build_trainer

        def build_and_fill(*args, **kwargs):
            trainer = build(*args, **kwargs)
            trainer.add_callback(fill_disk_after(at))
            return trainer

        tq.build_trainer = build_and_fill
    elif fault == "empty-adapter-save":
        save_model = transformers.Trainer.save_model

        def save_empty(self, output_dir=None, _internal_call=False):
            # What the Trainer wrote under FSDP before save_adapter_under_fsdp: the config, and no weights.
            save_model(self, output_dir, _internal_call)
            from safetensors.torch import save_file

            save_file({}, str(Path(output_dir) / tq.ADAPTER_WEIGHTS), metadata={"format": "pt"})

        transformers.Trainer.save_model = save_empty
    elif fault == "last-process-reads":
        other, argv = argv[0], argv[1:]
        if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
            continue_adapter, check_matches = tq.continue_adapter, tq.check_loaded_adapter_matches
            # This process faithfully loads and checks *its* copy; only the comparison across processes can see it.
            tq.continue_adapter = lambda model, prev: continue_adapter(model, other)
            tq.check_loaded_adapter_matches = lambda model, prev: check_matches(model, other)
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    sys.exit(tq.main(argv))
