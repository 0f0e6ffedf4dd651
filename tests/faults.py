"""Test fixture, not product: the trainer with a fault injected.

    python tests/faults.py oom CONFIG.yaml [--set ...]                 # the first training step runs out of GPU memory
    python tests/faults.py fill-disk-at-step N CONFIG.yaml [--set ...]  # after step N, fill the output disk
    python tests/faults.py empty-adapter-save CONFIG.yaml [--set ...]   # the save writes an adapter with no tensors
    python tests/faults.py speed-patches-do-not-fit CONFIG.yaml [--set ...]
        # the libraries the speed patches replace are stood in for by ones they were not written for
    python tests/faults.py earlier-loss-jumps-at-step N CONFIG.yaml [--set ...]
        # from step N on, the earlier stages' dev losses (eval_stage<K>_loss) come out 3 times what they are
    accelerate launch ... tests/faults.py last-process-reads DIR CONFIG.yaml [--set ...]
        # the last process continues the adapter in DIR instead of prev_checkpoint (a stale copy on one machine)
"""

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import transformers  # noqa: E402

import train_qlora_qwen3vl as tq  # noqa: E402
from curriculum import speed  # noqa: E402
from curriculum.adapter_files import ADAPTER_WEIGHTS
from curriculum.processes import runtime  # noqa: E402


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


def earlier_losses_jump_from(step: int):
    """The Trainer's evaluation loop, with the loss it reports on an earlier stage's dev split (the watch's
    `eval_stage<K>` prefix, during training) tripled from optimizer step `step` on: forgetting, as the watch sees it,
    logged and recorded like any loss."""
    evaluation_loop = transformers.Trainer.evaluation_loop

    def jumped(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = evaluation_loop(self, dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if metric_key_prefix.startswith("eval_stage") and self.state.global_step >= step:
            output.metrics[f"{metric_key_prefix}_loss"] *= 3
        return output

    return jumped


# Stand-ins for the library pieces the speed patches replace (tests/test_speed_guards.py); each takes a
# pytest.MonkeyPatch.


def liger_qwen3_vl_missing(mp):
    """Liger's Qwen3-VL module fails to import as with liger-kernel 0.8.5 over transformers 5.24: its output class
    is not defined (Liger defines it only where transformers has Qwen3VLCausalLMOutputWithPast)."""
    from liger_kernel.transformers.model import output_classes

    mp.setattr(speed, "gpu_available", lambda: True)  # the check goes past "no GPU" to the import
    mp.delattr(output_classes, "LigerQwen3VLCausalLMOutputWithPast")
    mp.delitem(sys.modules, "liger_kernel.transformers.model.qwen3_vl", raising=False)  # imported anew


def vision_attention_changed(mp):
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    own = modeling_qwen3_vl.Qwen3VLVisionAttention.forward

    def forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
        return own(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)

    mp.setattr(modeling_qwen3_vl.Qwen3VLVisionAttention, "forward", forward)


def peft_without_4bit_lora(mp):
    """peft's bnb module without the LoRA layer class for 4-bit weights (everything else of it stays)."""
    import peft.tuners.lora.bnb as bnb

    stand_in = types.ModuleType(bnb.__name__)
    stand_in.__dict__.update({k: v for k, v in vars(bnb).items() if k not in ("Linear4bit", "__name__")})
    mp.setitem(sys.modules, bnb.__name__, stand_in)


def trainer_compute_loss_changed(mp):
    from transformers import Trainer

    own = Trainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, loss_kwargs=None):
        return own(self, model, inputs, return_outputs, num_items_in_batch)

    mp.setattr(Trainer, "compute_loss", compute_loss)


def rope_index_reads_the_model(mp):
    """get_rope_index as it would be if it read more of the model than its config (a cached value, say): the
    stand-in that MRopePositions runs it on would not have it."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    own = modeling_qwen3_vl.Qwen3VLModel.get_rope_index

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        self.rope_deltas  # noqa: B018 - read, as a get_rope_index that caches would
        return own(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask, **kwargs)

    mp.setattr(modeling_qwen3_vl.Qwen3VLModel, "get_rope_index", get_rope_index)



def image_features_without_the_cast(mp):
    """get_image_features as it would be if it handed the vision tower the pixels as they come (a transformers that
    relies on autocast for the dtype): without autocast the tower would get float32 pixels."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    own = modeling_qwen3_vl.Qwen3VLModel.get_image_features

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return own(self, pixel_values, image_grid_thw, **kwargs)

    mp.setattr(modeling_qwen3_vl.Qwen3VLModel, "get_image_features", get_image_features)


def text_attention_not_declared_causal(mp):
    """A text attention whose __init__ no longer declares it causal (is_causal = True): the guard cannot know that
    the mask may go."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    own = modeling_qwen3_vl.Qwen3VLTextAttention.__init__

    def __init__(self, config, layer_idx):
        own(self, config, layer_idx)

    mp.setattr(modeling_qwen3_vl.Qwen3VLTextAttention, "__init__", __init__)


def deepstack_changed(mp):
    """_deepstack_process as it would be if it took the features in another form (a list per layer, say)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    own = modeling_qwen3_vl.Qwen3VLTextModel._deepstack_process

    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds, layer_idx=None):
        return own(self, hidden_states, visual_pos_masks, visual_embeds)

    mp.setattr(modeling_qwen3_vl.Qwen3VLTextModel, "_deepstack_process", _deepstack_process)


def triton_missing(mp):
    """A GPU machine without triton (torch's CPU wheel with a CUDA card, say)."""
    import importlib.util

    mp.setattr(speed, "gpu_available", lambda: True)  # the check goes past "no GPU" to triton
    own = importlib.util.find_spec
    mp.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "triton" else own(name, *a, **k))


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
    elif fault == "earlier-loss-jumps-at-step":
        at, argv = int(argv[0]), argv[1:]
        transformers.Trainer.evaluation_loop = earlier_losses_jump_from(at)
    elif fault == "empty-adapter-save":
        save_model = transformers.Trainer.save_model

        def save_empty(self, output_dir=None, _internal_call=False):
            # What the Trainer wrote under FSDP before save_adapter_under_fsdp: the config, and no weights.
            save_model(self, output_dir, _internal_call)
            from safetensors.torch import save_file

            save_file({}, str(Path(output_dir) / ADAPTER_WEIGHTS), metadata={"format": "pt"})

        transformers.Trainer.save_model = save_empty
    elif fault == "speed-patches-do-not-fit":
        mp = pytest.MonkeyPatch()  # never undone: the whole run sees the stand-ins
        for stand_in in (liger_qwen3_vl_missing, vision_attention_changed, peft_without_4bit_lora,
                         trainer_compute_loss_changed, rope_index_reads_the_model, image_features_without_the_cast,
                         text_attention_not_declared_causal, deepstack_changed, triton_missing):
            stand_in(mp)
    elif fault == "last-process-reads":
        other, argv = argv[0], argv[1:]
        if runtime().rank == runtime().world_size - 1:
            continue_adapter, check_matches = tq.continue_adapter, tq.check_loaded_adapter_matches
            # This process faithfully loads and checks *its* copy; only the comparison across processes can see it.
            tq.continue_adapter = lambda model, prev: continue_adapter(model, other)
            tq.check_loaded_adapter_matches = lambda model, prev: check_matches(model, other)
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    sys.exit(tq.main(argv))
