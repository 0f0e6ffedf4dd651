"""A split's line or row -> a Record: the question as chat messages, the answer as the exact text the model is
trained to reply. And a Record -> the prompt as the model reads it and the reply as it is trained, the same for
training and for answering.

Pure functions over plain values (no model): tests/test_data.py checks them on literal records.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from curriculum.config import DataColumns
from curriculum.errors import ConfigError

QUESTION_TYPES = ("single_choice", "numeric", "multi_label", "free_text")
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NUMBER_TEXT = re.compile(r"[-+]?\d+(?:\.\d+)?")  # an answer that is a number: a numeric question, when inferred


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
    references: list[str] | None = None  # free_text: every reference answer; a match with any of them counts
    type_inferred: bool = False  # the type came from the row's answer and options, not from a type column


def format_question(question: str, qtype: str, options: list | None) -> str:
    """The user text: the question, lettered options, and how to answer."""
    if qtype == "numeric":
        return f"{question}\nAnswer with a number."
    if qtype == "free_text":  # the short-answer instruction of LLaVA's VQA data, which Qwen-VL models know
        return f"{question}\nAnswer the question using a single word or phrase."
    lines = [question] + [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    if qtype == "single_choice":
        return "\n".join(lines) + "\nAnswer with the option's letter."
    return "\n".join(lines) + "\nAnswer with the letters of all correct options, separated by commas."


def format_answer(answer: Any, qtype: str) -> str:
    """The assistant's target text: `B`, `3`, `A, C`."""
    if qtype == "multi_label":
        return ", ".join(sorted(answer))
    return str(answer).strip()


def column_label(columns: DataColumns | None, field: str) -> str:
    """How an error names one of our fields: the column (or key) it is read from, and the config key naming it."""
    return f"column '{column_name(columns, field)}' (columns.{field})"


def is_number(value: Any) -> bool:
    """A number, or a text that is one (`3`, `-2.5`): what makes an answer numeric when the type is inferred."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return NUMBER_TEXT.fullmatch(value.strip()) is not None
    return isinstance(value, (int, float))


def reference_texts(value: Any, source: str, columns: DataColumns | None, field: str = "references") -> list[str]:
    """Reference answers as texts, from a list of texts or numbers (DocVQA's, TextVQA's `answers`, ChartQA's
    `label`), or of dicts with an `answer` key (VQAv2's `answers`: {answer, answer_confidence, answer_id}); one text
    is one reference. Empty texts are left out (TextVQA's test split holds ten of them)."""
    texts = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            if "answer" not in item:
                raise ConfigError(f"{source}: {column_label(columns, field)} holds a dict without an 'answer' key "
                                  f"(keys: {', '.join(map(str, item)) or 'none'}); expected texts, or dicts with an "
                                  "'answer' as VQAv2 writes them")
            item = item["answer"]
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise ConfigError(f"{source}: {column_label(columns, field)} holds {item!r}; expected answer texts")
        if str(item).strip():
            texts.append(str(item).strip())
    return texts


def most_common(texts: list[str]) -> str:
    """The answer most references give (the first of them on a tie): what VQAv2 calls the multiple-choice answer."""
    counts = Counter(texts)
    return max(texts, key=lambda t: counts[t])  # max keeps the first of equal counts


def _answer_items(answer: Any, options: list) -> list:
    """The items an answer for options names, before they are checked: a list as it is; a text naming one option
    (its letter or its own text) as itself, else split at commas (`A, C`, `red, blue`); a number (an index) alone."""
    if isinstance(answer, list):
        return answer
    if isinstance(answer, str):
        whole = answer.strip()
        if whole in OPTION_LETTERS[:len(options)] or whole.lower() in {str(o).strip().lower() for o in options}:
            return [whole]
        return [a.strip() for a in whole.split(",")]
    return [answer]


def option_letters(answer: Any, options: list, source: str, columns: DataColumns | None) -> list[str] | None:
    """The letters of the options an answer names: by letter (`B`, ["A", "C"], `A, C`), by 0-based index (ScienceQA's
    `answer: 2`, A-OKVQA's `correct_choice_idx`) or by the option's text (`blue`). None when an item names no option;
    an index past the options is an error naming the column."""
    letters = OPTION_LETTERS[:len(options)]
    by_text = {str(o).strip().lower(): OPTION_LETTERS[i] for i, o in enumerate(options)}
    named = []
    for item in _answer_items(answer, options):
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < len(options):
                raise ConfigError(f"{source}: {column_label(columns, 'answer')}: index {item} is not one of the "
                                  f"{len(options)} options of {column_label(columns, 'options')} (0 to "
                                  f"{len(options) - 1})")
            named.append(letters[item])
        elif isinstance(item, str) and item.strip() in letters:  # a letter first: the format of our own splits
            named.append(item.strip())
        elif isinstance(item, str) and item.strip().lower() in by_text:
            named.append(by_text[item.strip().lower()])
        else:
            return None
    return named or None


def infer_question_type(answer: Any, options: list | None, references: Any) -> str | None:
    """A row's type from what it holds, when no type is given: options present: single_choice, or multi_label when
    the answer names several (a list, or a text naming several options); a list of reference answers: free_text
    (scored against each, numbers included); a number: numeric; another text: free_text. None: it cannot be typed."""
    if options:
        named = _answer_items(answer, options)
        return "multi_label" if isinstance(answer, list) or len(named) > 1 else "single_choice"
    if references is not None or isinstance(answer, list):
        return "free_text"
    if is_number(answer):
        return "numeric"
    if isinstance(answer, str) and answer.strip():
        return "free_text"
    return None


def _vqa_record(obj: dict, source: str, image_of, columns: DataColumns | None = None,
                question_type: str = "auto") -> tuple[str, bool, str | None, str, str, list | None, list | None]:
    """Check a VQA record's fields; return (type, whether it was inferred, image path, user text, answer text,
    options, references). `image_of(cell, source)` turns the image field into a path (and checks it). The type is
    `question_type` unless that is `auto`, then the row's own (its type column), else inferred from the row."""
    missing = [k for k in ("question", "answer") if k not in obj and not (k == "answer" and "references" in obj)]
    if missing:
        raise ConfigError(f"{source}: missing field(s) " + ", ".join(
            k if column_name(columns, k) == k else f"{k} (column '{column_name(columns, k)}')" for k in missing))
    options = obj.get("options") or None  # null or [] (a numeric row of a table): no options
    answer, references = obj.get("answer"), obj.get("references")
    qtype = obj.get("type") if question_type == "auto" else question_type
    inferred = qtype is None
    if inferred:
        qtype = infer_question_type(answer, options, references)
        if qtype is None:
            raise ConfigError(f"{source}: cannot infer the question type from {column_label(columns, 'answer')}: "
                              f"{answer!r} (no options, not a number, not a text); fix the row, or give its type "
                              f"in {column_label(columns, 'type')} or for the whole split with question_type")
    if qtype not in QUESTION_TYPES:
        raise ConfigError(f"{source}: unknown question type {qtype!r} in {column_label(columns, 'type')}; expected one "
                          f"of {', '.join(QUESTION_TYPES)}")
    if qtype in ("single_choice", "multi_label"):
        if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
            raise ConfigError(f"{source}: a {qtype} question needs a list of 2 to 26 options")
        named = option_letters(answer, options, source, columns)
        if named is None:
            raise ConfigError(f"{source}: answer {answer!r} is not among the options' letters "
                              f"{', '.join(OPTION_LETTERS[:len(options)])} (nor their texts, nor an index)")
        if qtype == "single_choice" and len(set(named)) != 1:
            raise ConfigError(f"{source}: a single_choice answer names one option; {answer!r} names "
                              f"{', '.join(sorted(set(named)))}")
        answer = sorted(set(named)) if qtype == "multi_label" else named[0]
        references = None
    elif qtype == "numeric":
        if not is_number(answer):
            raise ConfigError(f"{source}: a numeric answer must be a number, got {answer!r}")
        references = None
    else:  # free_text: the answer text trains; every reference scores (the answer alone when there are none)
        if isinstance(answer, list):  # an answer column holding a list (no options): the reference answers
            answer, references = None, answer if references is None else references
        texts = reference_texts(references, source, columns) if references is not None else []
        if isinstance(answer, bool) or answer is not None and not isinstance(answer, (str, int, float)):
            raise ConfigError(f"{source}: {column_label(columns, 'answer')} holds {answer!r}; a free_text answer "
                              "is a text")
        if answer is None or not str(answer).strip():
            if not texts:
                raise ConfigError(f"{source}: no answer: {column_label(columns, 'answer')} and "
                                  f"{column_label(columns, 'references')} are empty")
            answer = most_common(texts)
        references = texts or [str(answer).strip()]
        options = None
    image = image_of(obj["image"], source) if obj.get("image") else None
    return (qtype, inferred, image, format_question(obj["question"], qtype, options), format_answer(answer, qtype),
            obj.get("options") if qtype != "free_text" else None, references)


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


def record_from_fields(obj: dict, source: str, default_id: Any, system_prompt: str | None, image_of,
                       columns: DataColumns | None = None, question_type: str = "auto") -> Record:
    """One JSONL line or dataset row, its fields under our names, as a Record; a ConfigError naming `source`. A VQA
    row without an id is known by its file and line (or row): `source`."""
    if "messages" in obj:
        image, prompt, answer = _chat_record(obj, source, image_of)
        return Record(str(obj.get("id", default_id)), "chat", image, prompt, answer, source)
    qtype, inferred, image, text, answer, options, references = _vqa_record(obj, source, image_of, columns,
                                                                           question_type)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    prompt = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt
              else []) + [{"role": "user", "content": content}]
    return Record(str(obj["id"]) if "id" in obj else source, qtype, image, prompt, answer, source, options,
                  references, inferred)


def column_name(columns: DataColumns | None, field: str) -> str:
    """Where our field `field` is in a split: the name the config's `columns:` gives it (None: the defaults)."""
    return getattr(columns or DataColumns(), field)


def fields_by_our_names(row: dict, columns: DataColumns | None) -> dict:
    """A line's or row's fields under the names the checks use, found under the names `columns:` gives them (None:
    the default names). A column named for two fields (answer and references may share one) gives its value to
    both."""
    return {ours: row[theirs] for ours, theirs in vars(columns or DataColumns()).items() if theirs in row}


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
