"""A split's line or row -> a Record: the question as chat messages, the answer as the exact text the model is
trained to reply. And a Record -> the prompt as the model reads it and the reply as it is trained, the same for
training and for answering.

Pure functions over plain values (no model): tests/test_data.py checks them on literal records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curriculum.errors import ConfigError

QUESTION_TYPES = ("single_choice", "numeric", "multi_label", "free_text")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Record:
    """One question. `prompt_messages` end with the user turn; `answer` is the assistant's exact reply text."""
    id: str
    type: str
    image: str | None
    prompt_messages: list
    answer: str
    source: str  # "file:line", for error messages
    options: list | None = None


def format_question(question: str, qtype: str, options: list | None) -> str:
    """The user text: the question, lettered options, and how to answer."""
    if qtype == "numeric":
        return f"{question}\nAnswer with a number."
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    if qtype == "single_choice":
        return "\n".join(lines) + "\nAnswer with the option's letter."
    return "\n".join(lines) + "\nAnswer with the letters of all correct options, separated by commas."


def format_answer(answer: Any, qtype: str) -> str:
    """The assistant's target text: `B`, `3`, `A, C`."""
    if qtype == "multi_label":
        return ", ".join(sorted(answer))
    return str(answer).strip()


def _vqa_record(obj: dict, source: str, image_of) -> tuple[str, str | None, str, str]:
    """Check a VQA record's fields; return (type, image path, user text, answer text). `image_of(cell, source)`
    turns the image field into a path (and checks it)."""
    missing = [k for k in ("id", "question", "type", "answer") if k not in obj]
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    qtype, options, answer = obj["type"], obj.get("options"), obj["answer"]
    if qtype not in QUESTION_TYPES:
        raise ConfigError(f"{source}: unknown question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}")
    if qtype != "numeric":
        if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
            raise ConfigError(f"{source}: a {qtype} question needs a list of 2 to 26 options")
        letters = OPTION_LETTERS[:len(options)]
        given = answer if qtype == "multi_label" else [answer]
        if not isinstance(given, list) or not given or any(a not in letters for a in given):
            raise ConfigError(f"{source}: answer {answer!r} is not among the options' letters {', '.join(letters)}")
    elif isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ConfigError(f"{source}: a numeric answer must be a number, got {answer!r}")
    image = image_of(obj["image"], source) if obj.get("image") else None
    return qtype, image, format_question(obj["question"], qtype, options), format_answer(answer, qtype)


def _chat_record(obj: dict, source: str, image_of) -> tuple[str | None, list, str]:
    """The chat format other tools write: {"messages": [...], "images": [...]}, `<image>` in the user text."""
    messages, images = obj["messages"], obj.get("images") or []
    if not messages or messages[-1].get("role") != "assistant":
        raise ConfigError(f"{source}: the last message must be the assistant's answer")
    if len(images) > 1:
        raise ConfigError(f"{source}: one image per record is supported, got {len(images)}")
    prompt = []
    for msg in messages[:-1]:
        text = msg.get("content", "")
        if not isinstance(text, str):
            raise ConfigError(f"{source}: message content must be a string in the chat format")
        if "<image>" in text:
            before, _, after = text.partition("<image>")
            content = [c for c in ({"type": "text", "text": before} if before else None, {"type": "image"},
                                   {"type": "text", "text": after} if after else None) if c]
            prompt.append({"role": msg["role"], "content": content})
        else:
            prompt.append({"role": msg["role"], "content": [{"type": "text", "text": text}]})
    image = image_of(images[0], source) if images else None
    return image, prompt, str(messages[-1]["content"]).strip()


def record_from_fields(obj: dict, source: str, default_id: Any, system_prompt: str | None, image_of) -> Record:
    """One JSONL line or dataset row, its fields under our names, as a Record; a ConfigError naming `source`."""
    if "messages" in obj:
        image, prompt, answer = _chat_record(obj, source, image_of)
        return Record(str(obj.get("id", default_id)), "chat", image, prompt, answer, source)
    qtype, image, text, answer = _vqa_record(obj, source, image_of)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    prompt = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt
              else []) + [{"role": "user", "content": content}]
    return Record(str(obj["id"]), qtype, image, prompt, answer, source, obj.get("options"))


def column_name(columns, field: str) -> str:
    """Where our field `field` is in a split: the name the config's `columns:` (a DataColumns) gives it, or our own
    name without one."""
    return field if columns is None else getattr(columns, field)


def fields_by_our_names(row: dict, columns) -> dict:
    """A line's or row's fields under the names the checks use, found under the names `columns:` gives them (none
    given: they are under our names already)."""
    if columns is None:
        return dict(row)
    ours_by_theirs = {theirs: ours for ours, theirs in vars(columns).items()}
    return {ours_by_theirs[k]: v for k, v in row.items() if k in ours_by_theirs}


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """The assistant's reply as trained: the answer text and `<|im_end|>` (the stop token)."""
    return tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]


def with_image_settings(messages: list, image_path: str | None, min_pixels: int, max_pixels: int) -> list:
    """Messages with the image path and the pixel budget inside the image item, as qwen_vl_utils reads them."""
    out = []
    for msg in messages:
        content = [dict(c, image=image_path, min_pixels=min_pixels, max_pixels=max_pixels)
                   if c.get("type") == "image" else c for c in msg["content"]]
        out.append({"role": msg["role"], "content": content})
    return out


def prompt_and_images(processor, rec: Record, min_pixels: int, max_pixels: int) -> tuple[str, list]:
    """A record's prompt as the model reads it (chat template, up to the assistant's turn) and its images, decoded
    and resized: the same for training (the recipe's encode_example) and for answering (evaluation's
    GenerationInputs)."""
    from qwen_vl_utils import process_vision_info  # imports torch: not for the pure functions above

    messages = with_image_settings(rec.prompt_messages, rec.image, min_pixels, max_pixels)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text, process_vision_info(messages, image_patch_size=16)[0] if rec.image else []
