"""Where the base model comes from: `tiny-qwen3vl`, the random tiny Qwen3-VL of the demo and the tests (built on
first use by tiny_qwen3vl.py), or a hub id or local folder; loaded with remote code off unless the config allows it,
and its processor with the config's pixel budget. (The 4-bit load itself is the recipe's load_quantized_base.)
"""

from __future__ import annotations

from pathlib import Path

from curriculum.config import QuantizationSettings, StageConfig
from curriculum.errors import ConfigError
from curriculum.processes import fsdp_enabled, print_main, processes

REPO_DIR = Path(__file__).resolve().parents[1]
TINY_MODEL_NAME = "tiny-qwen3vl"
TINY_MODEL_DIR = REPO_DIR / "models" / TINY_MODEL_NAME


def resolve_model_path(name_or_path: str) -> str:
    """`tiny-qwen3vl` -> the local tiny model (built on first use); anything else is returned as given."""
    if name_or_path != TINY_MODEL_NAME:
        return name_or_path
    with processes().main_process_first():  # one process builds it; the others wait, then find it built
        if not (TINY_MODEL_DIR / "config.json").is_file():
            from tiny_qwen3vl import build_random_qwen3vl  # transformers and torch: only when it is built

            print_main(f"Building the tiny random Qwen3-VL at {TINY_MODEL_DIR} (first use, a few seconds)")
            build_random_qwen3vl(TINY_MODEL_DIR, shape="tiny", seed=0)
    return str(TINY_MODEL_DIR)


def from_pretrained_checked(auto_class, model_path: str, cfg: StageConfig, **kwargs):
    """`auto_class.from_pretrained` with trust_remote_code passed explicitly (off unless the config, a StageConfig,
    turns it on); a checkpoint that needs its own code is then a config error, not a traceback."""
    try:
        return auto_class.from_pretrained(model_path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"model_name_or_path: {model_path} ships its own Python code, which is not run unless "
                          "trust_remote_code: true. Turn it on only if you trust that checkpoint.") from None


def load_processor(model_path: str, cfg: StageConfig):
    """The Qwen3-VL processor with the config's pixel budget set on the image processor itself.

    Passing `max_pixels=` to the processor call is silently ignored by some transformers versions; the
    image processor's `size` (shortest_edge = min pixels, longest_edge = max pixels) is always honoured.
    """
    from transformers import AutoProcessor  # not at import: the recipe's config errors answer without it

    processor = from_pretrained_checked(AutoProcessor, model_path, cfg)
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    return processor


def quant_storage_dtype(q: QuantizationSettings) -> str:
    """The dtype the packed 4-bit weights are stored in (`q`: the config's QuantizationSettings). `auto`: the compute
    dtype under FSDP (it shards only floating-point tensors), else bitsandbytes' uint8."""
    if q.quant_storage != "auto":
        return q.quant_storage
    return q.compute_dtype if fsdp_enabled() else "uint8"


def bnb_config(q: QuantizationSettings):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, quant_storage_dtype(q)))


def align_special_tokens(model, tokenizer) -> None:
    """The model's text config and generation config take the tokenizer's end, start and padding ids, as the Trainer
    would do on its own (transformers' align_special_tokens), but without its warning ("The tokenizer has new
    PAD/BOS/EOS tokens ..."), which reads like a broken install: Qwen3-VL's checkpoints name no padding id in their
    text config, and the tokenizer pads with <|endoftext|>. A config that lists several end ids keeps them all."""
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is None:  # a token the tokenizer does not define leaves the config as it is (as transformers)
            continue
        for config in filter(None, configs):
            current = getattr(config, name, None)
            ids = current if isinstance(current, list) else [current]
            if token_id in ids:
                continue
            several = name == "eos_token_id" and isinstance(current, list)
            setattr(config, name, [token_id, *(i for i in ids if i is not None)] if several else token_id)
