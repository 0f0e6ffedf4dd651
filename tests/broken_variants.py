"""Test fixture, not product: the trainer with one of the textbook curriculum bugs put back in.

    python tests/broken_variants.py fresh  CONFIG.yaml [--set ...]   # stage >= 2 makes a fresh adapter
    python tests/broken_variants.py frozen CONFIG.yaml [--set ...]   # reloads with is_trainable left False
    ... --guarded                                                    # the same, with the product's guards on

The curriculum tests run these to prove that their checks fail when the adapter is not continued.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_qlora_qwen3vl as tq  # noqa: E402
from curriculum.adapter_files import loaded_adapter_sha256, read_adapter_lora
from curriculum.config import LoraSettings


def fresh_adapter_instead(model, prev_checkpoint):
    # The classic mistake: get_peft_model again, so stage 2 starts from B = 0, as if stage 1 never ran.
    saved = read_adapter_lora(prev_checkpoint)
    return tq.new_adapter(model, LoraSettings(**saved), seed=0)


def frozen_reload(model, prev_checkpoint):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, prev_checkpoint)  # is_trainable defaults to False


def no_trainable_guard(model, lora):
    # A textbook script has no trainable-parameter check; train whatever requires grad.
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def no_lineage_guard(model, prev_checkpoint):
    # ... nor a check that the weights in memory are the ones the previous stage saved.
    return loaded_adapter_sha256(model)


if __name__ == "__main__":
    variant, argv = sys.argv[1], sys.argv[2:]
    if variant not in ("fresh", "frozen"):
        raise SystemExit(f"unknown variant {variant!r}")
    tq.continue_adapter = fresh_adapter_instead if variant == "fresh" else frozen_reload
    if "--guarded" not in argv:  # --guarded keeps the product's checks, to show they stop the bug
        tq.check_adapter_trainable = no_trainable_guard
        tq.check_loaded_adapter_matches = no_lineage_guard
        tq.check_saved_adapter = lambda saved_tensors, trainable, staging: None  # nor a check of the file it writes
    sys.exit(tq.main([a for a in argv if a != "--guarded"]))
