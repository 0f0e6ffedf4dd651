"""Reading a split from disk and checking it before training: a JSONL file or a Hugging Face dataset (a .parquet or
.arrow file, or a folder) into Records (curriculum/records.py), image paths kept inside the data folder, images stored
in a dataset written out as files, every image decoded once (the clean ones remembered in a cache that later stages
share), and every sample's length in tokens measured, so that no bad record or over-long sample surfaces mid-run.

`datasets` and qwen_vl_utils are imported inside the functions that need them: both pull in torch, and a JSONL
split, a config error or a test of the parsing must not wait for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile
from tqdm import tqdm

from curriculum.config import DataColumns, StageConfig
from curriculum.errors import ConfigError
from curriculum.hashing import sha256_file
from curriculum.processes import is_main_process, print_main
from curriculum.records import Record, answer_token_ids, column_name, fields_by_our_names, record_from_fields

SPLIT_FILE_SUFFIXES = (".jsonl", ".parquet", ".arrow")  # JSONL, or a Hugging Face dataset (also: a folder)
TABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow", ".csv")  # a dataset folder's data, beside its images
IMAGE_CHECK_CACHE = "image_checks.json"


# ---------------------------------------------------------------------------------------------------------------------
# Records from a JSONL file or a dataset; every bad line named
# ---------------------------------------------------------------------------------------------------------------------


def split_file_problems(cfg: StageConfig) -> list[str]:
    """What is wrong with the splits the config names, before anything is read: a file that is not there or not of a
    kind the trainer reads. (A column named for two fields is DataColumns.problems'.)"""
    problems = []
    for key in ("train_file", "eval_file", "test_file"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).exists():
            problems.append(f"{key}: file not found: {value}")
        elif value is not None and Path(value).is_file() and Path(value).suffix not in SPLIT_FILE_SUFFIXES:
            problems.append(f"{key}: {value} is not a split the trainer reads: a .jsonl, .parquet or .arrow file, or "
                            "a dataset folder")
    return problems


def image_path(base_dir: Path, image: str, source: str, allow_outside: bool) -> str:
    """The image's path, relative to the JSONL file's folder; refused if it leads outside it (unless allowed).
    The check is on the path as written (`..`, absolute paths), so a symlinked data folder still works."""
    path = os.path.normpath(base_dir / image)
    if not allow_outside and os.path.commonpath([os.path.abspath(path), os.path.abspath(base_dir)]) != \
            os.path.abspath(base_dir):
        raise ConfigError(f"{source}: image path {image!r} leads outside the data folder {base_dir}; move the "
                          "image inside it, or set allow_images_outside_data_dir: true")
    return path


def read_records(path: str | os.PathLike, system_prompt: str | None = None, allow_outside: bool = False,
                 columns=None, image_dir: Path | None = None,
                 question_type: str = "auto") -> tuple[list[Record], list[str]]:
    """Parse a split: (the valid Records, one `file:line: problem` per invalid line). Images not opened. `columns`
    is the config's DataColumns (None: the fields are under our names), `question_type` its question_type (`auto`:
    each row's type column, else inferred). A path that is not a .jsonl file is a Hugging Face dataset
    (read_dataset_records; its images stored as bytes are written to `image_dir`)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return read_dataset_records(path, system_prompt, allow_outside, columns, image_dir, question_type)
    base_dir, records, problems = path.parent, [], []

    def image_of(image: str, source: str) -> str:
        return image_path(base_dir, image, source, allow_outside)

    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{line_no}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{source}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{source}: expected a JSON object")
            records.append(record_from_fields(fields_by_our_names(obj, columns), source, line_no, system_prompt,
                                              image_of, columns, question_type))
        except ConfigError as err:
            problems.append(str(err))
    return records, problems


def open_dataset(path: Path):
    """A split of a Hugging Face dataset: a .parquet or .arrow file, a folder written by `save_to_disk`, or a folder
    `load_dataset` reads (parquet files, or `imagefolder` images with a metadata.jsonl). One split only."""
    import datasets

    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
        elif path.is_dir():
            dataset = datasets.load_dataset(str(path))
        elif path.suffix in (".parquet", ".arrow"):
            dataset = datasets.load_dataset(path.suffix[1:], data_files=str(path))
        else:
            raise ConfigError(f"{path}: not a split the trainer reads: a .jsonl, .parquet or .arrow file, or a "
                              "dataset folder")
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets and pyarrow raise many types for a file they cannot read
        raise ConfigError(f"{path}: cannot be read as a Hugging Face dataset ({type(err).__name__}: {err})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise ConfigError(f"{path} holds the splits {', '.join(dataset)}; name one split's file or folder")
        dataset = next(iter(dataset.values()))
    return dataset


def write_image_bytes(data: bytes, image_dir: Path, name: str | None) -> str:
    """An image stored inside a dataset, as a file: written once under `image_dir`, named by its SHA-256 (an image
    met again, in this split or another, is the same file), through a temporary name so that a reader never sees
    half of it."""
    target = image_dir / f"{hashlib.sha256(data).hexdigest()}{Path(name).suffix.lower() if name else ''}"
    if not target.is_file():
        image_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(target)
    return str(target)


def read_dataset_records(path: Path, system_prompt: str | None, allow_outside: bool, columns: DataColumns | None,
                         image_dir: Path | None, question_type: str = "auto") -> tuple[list[Record], list[str]]:
    """read_records for a Hugging Face dataset: the same checks, problems named `file:row N` (N counts from 0, as
    `dataset[N]`). An image cell holds bytes (an `Image` column written by `datasets`), which become a file in
    `image_dir`, so that the image checks, the cache of checked images and the dataloader workers treat it as a
    JSONL image; or a path (an `Image` column of files, or text), checked as a JSONL image path."""
    dataset = open_dataset(path)
    if column_name(columns, "messages") not in dataset.column_names:
        # only a question and its answer are needed: the id defaults to the row, the type is inferred per row
        there, lacking = set(dataset.column_names), []
        if column_name(columns, "question") not in there:
            lacking.append(f"'{column_name(columns, 'question')}' (columns.question)")
        if not {column_name(columns, "answer"), column_name(columns, "references")} & there:
            lacking.append(f"'{column_name(columns, 'answer')}' (columns.answer) or "
                           f"'{column_name(columns, 'references')}' (columns.references)")
        if lacking:
            raise ConfigError(f"{path}: no column {', '.join(lacking)}; its columns are "
                              f"{', '.join(dataset.column_names)}. Name yours under `columns:` in the config")
    base_dir = path if path.is_dir() else path.parent
    stored = set()  # the images stored in the dataset, as the files they were written to

    def image_of(cell: Any, source: str) -> str | None:
        if isinstance(cell, dict) and cell.get("bytes"):
            if image_dir is None:
                raise ValueError("image_dir is needed to read images stored in a dataset")
            image = write_image_bytes(cell["bytes"], image_dir, cell.get("path"))
            stored.add(image)
            return image
        cell = cell.get("path") if isinstance(cell, dict) else cell
        if cell is None:  # an Image cell with neither bytes nor a file: no image
            return None
        if not isinstance(cell, str):
            raise ConfigError(f"{source}: the image is neither an image nor a path: {type(cell).__name__}")
        return image_path(base_dir, cell, source, allow_outside)

    records, problems = [], []
    # arrow rows as stored: images as {bytes, path}, not decoded here (a broken one is found by the image check)
    rows = (cells for batch in dataset.with_format("arrow").iter(batch_size=1000) for cells in batch.to_pylist())
    for row, cells in enumerate(rows):
        source = f"{path}:row {row}"
        obj = fields_by_our_names({k: v for k, v in cells.items() if v is not None}, columns)
        try:
            records.append(record_from_fields(obj, source, row, system_prompt, image_of, columns, question_type))
        except ConfigError as err:
            problems.append(str(err))
    if stored:
        print_main(f"{path}: {len(stored)} images stored in the dataset, read from their files in {image_dir}")
    return records, problems


def bad_records_error(path: str | os.PathLike, problems: list[str], shown: int = 20) -> ConfigError:
    listed = "\n".join(f"  {p}" for p in problems[:shown])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return ConfigError(f"{len(problems)} bad record(s) in {path}:\n{listed}{more}\n"
                       "Fix them, or set on_bad_record: skip to train without them.")


def load_records(path: str | os.PathLike, system_prompt: str | None = None, allow_outside: bool = False,
                 columns=None, image_dir: Path | None = None, question_type: str = "auto") -> list[Record]:
    """Parse a split (JSONL or a dataset) into Records; any problem is an error naming every bad file:line."""
    records, problems = read_records(path, system_prompt, allow_outside, columns, image_dir, question_type)
    if problems:
        raise bad_records_error(path, problems)
    if not records:
        raise ConfigError(f"{path}: no records")
    return records


def split_hashes(cfg: StageConfig) -> dict:
    """{train_file|eval_file|test_file: {path, sha256}} of the splits a StageConfig names: what a stage trained and
    was measured on, by content (for its model card and the verifier)."""
    return {key: {"path": getattr(cfg, key), "sha256": split_sha256(getattr(cfg, key))}
            for key in ("train_file", "eval_file", "test_file") if getattr(cfg, key)}


def split_sha256(path: str | os.PathLike) -> str:
    """A split's SHA-256: of the file, or, for a dataset folder, of its table files by relative path (not its
    image files: as for JSONL, images are checked, not hashed)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TABLE_SUFFIXES):
        h.update(f"{file.relative_to(path)}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Images: every one decoded before training, the clean ones remembered; their sizes give the token counts
# ---------------------------------------------------------------------------------------------------------------------


def image_token_count(width: int, height: int, min_pixels: int, max_pixels: int) -> int:
    """Image tokens for an image of this size: one per 32x32 pixels after Qwen's resize (patch 16, merge 2)."""
    from qwen_vl_utils import smart_resize

    h, w = smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // 32) * (w // 32)


def _decode_image(path: str) -> tuple[tuple[int, int] | None, str | None]:
    try:
        with Image.open(path) as img:
            img.load()  # the whole file: a header alone does not show truncation
            return img.size, None
    except FileNotFoundError:
        return None, f"image not found: {path}"
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return None, f"cannot read image {path}: {err}"


def image_check_key(path: str) -> str | None:
    """What identifies one version of an image file: its absolute path, byte size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def read_image_check_cache(cache: Path | None) -> dict:
    """{image_check_key: [w, h]} of the images that decoded cleanly before; empty without a cache or when it is
    unreadable (it is only ever a shortcut: an image not in it is decoded again)."""
    if cache is None or not cache.is_file():
        return {}
    try:
        known = json.loads(cache.read_text())
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def write_image_check_cache(cache: Path, known: dict) -> None:
    """Written by the main process, whole and then renamed into place, so a reader never sees half a file."""
    if not is_main_process():
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    except OSError as err:  # a full or read-only disk costs the shortcut, never the run
        print_main(f"WARNING: could not write the image check cache {cache}: {err}")


def check_images(paths: list[str], desc: str = "Decoding images", cache: Path | None = None) -> tuple[dict, dict]:
    """Decode every image fully, in threads (PIL releases the GIL while decoding), so a missing, corrupt or
    truncated image stops the run now rather than at step 9,000. Returns ({path: (w, h)}, {path: problem}).
    With a cache file, images that decoded cleanly before (same path, size and modification time) are taken
    from it, and the newly decoded ones are added."""
    t = time.perf_counter()
    known = read_image_check_cache(cache)
    keys = {p: image_check_key(p) for p in paths}
    sizes = {p: tuple(known[keys[p]]) for p in paths if keys[p] in known}
    todo = [p for p in paths if p not in sizes]
    # Some libraries set this to accept truncated files silently; a training set must not.
    allowed, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(tqdm(pool.map(_decode_image, todo), total=len(todo), desc=desc, unit="img",
                                disable=len(todo) < 500, leave=False))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed
    decoded = {p: size for p, (size, _) in zip(todo, results, strict=True) if size}
    problems = {p: why for p, (_, why) in zip(todo, results, strict=True) if why}
    if cache is not None and decoded:
        write_image_check_cache(cache, known | {keys[p]: list(size) for p, size in decoded.items() if keys[p]})
    if cache is not None and paths:
        print_main(f"{desc}: {len(todo)} decoded, {len(sizes)} known to decode cleanly ({cache}), "
                   f"{time.perf_counter() - t:.1f} s")
    return sizes | decoded, problems


def image_check_cache(cfg: StageConfig) -> Path | None:
    """Where the images that decoded cleanly are remembered: beside the stages of the curriculum, so every stage
    and rerun shares it. `cfg` is the StageConfig."""
    return Path(cfg.output_dir).resolve().parent / ".cache" / IMAGE_CHECK_CACHE if cfg.cache_image_checks else None


def dataset_image_dir(cfg: StageConfig) -> Path:
    """Where images stored inside a dataset (an `Image` column's bytes) are written as files: beside the stages of
    the curriculum, as the image check cache, named by content so that every stage and rerun shares them."""
    return Path(cfg.output_dir).resolve().parent / ".cache" / "dataset_images"


def inspect_images(records: list[Record], split: str = "", cache: Path | None = None) -> tuple[dict, list[str]]:
    """Every image of a split decoded once: ({path: (w, h)}, one `file:line: problem` per record with a bad one)."""
    paths = sorted({r.image for r in records if r.image})
    sizes, bad = check_images(paths, f"Decoding {split} images" if split else "Decoding images", cache)
    return sizes, [f"{r.source}: {bad[r.image]}" for r in records if r.image in bad]


def describe_split(split: str, records: list[Record], sizes: dict, lengths: list[int], cfg: StageConfig) -> list[str]:
    """The summary lines `--check` (and every stage) prints: types, image sizes, resizing, lengths. Resizing is
    said here, once per split, rather than once per image."""
    from qwen_vl_utils import smart_resize

    counts = {t: sum(r.type == t for r in records) for t in sorted({r.type for r in records})}
    lines = [f"{split}: {len(records)} samples ({', '.join(f'{n} {t}' for t, n in counts.items())})"]
    inferred = [r.type for r in records if r.type_inferred]
    if inferred:
        by_type = ", ".join(f"{inferred.count(t)} {t}" for t in sorted(set(inferred)))
        lines.append(f"{split} types: {len(inferred)} of {len(records)} inferred per row, with no type in column "
                     f"'{cfg.columns.type}' (columns.type): {by_type}. To fix one type for the whole split instead, "
                     f"set question_type (e.g. question_type: {max(sorted(set(inferred)), key=inferred.count)})")
    used = sorted((sizes[path] for path in {r.image for r in records if r.image}), key=lambda wh: wh[0] * wh[1])
    if used:
        median = used[len(used) // 2]
        lines.append(f"{split} images: {len(used)} decoded, {used[0][0]}x{used[0][1]} to {used[-1][0]}x{used[-1][1]} "
                     f"(median {median[0]}x{median[1]})")
        for label, hit, pixels in (("over max_pixels", [s for s in used if s[0] * s[1] > cfg.max_pixels],
                                    cfg.max_pixels),
                                   ("under min_pixels", [s for s in used if s[0] * s[1] < cfg.min_pixels],
                                    cfg.min_pixels)):
            if hit:
                w, h = hit[-1] if label.startswith("over") else hit[0]
                nh, nw = smart_resize(h, w, factor=32, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
                lines.append(f"{split} images: {len(hit)} of {len(used)} are {label}={pixels} and are resized "
                             f"(e.g. {w}x{h} -> {nw}x{nh})")
    ordered = sorted(lengths)
    lines.append(f"{split} lengths: {ordered[0]} to {ordered[-1]} tokens (median {ordered[len(ordered) // 2]}), "
                 f"max_seq_len {cfg.max_seq_len}")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# A split checked as a whole: bad records, lengths, over-long samples
# ---------------------------------------------------------------------------------------------------------------------


def sample_lengths(records: list[Record], processor, cfg: StageConfig, sizes: dict | None = None) -> list[int]:
    """Each record's length in tokens, image tokens included, computed from the image sizes (no pixels needed)."""
    if sizes is None:
        sizes, problems = inspect_images(records)
        if problems:
            raise ConfigError(problems[0])
    lengths = []
    for rec in records:
        text = processor.apply_chat_template(rec.prompt_messages, add_generation_prompt=True, tokenize=False)
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n += len(answer_token_ids(processor.tokenizer, rec.answer))
        if rec.image:
            n += image_token_count(*sizes[rec.image], cfg.min_pixels, cfg.max_pixels) - 1
        lengths.append(n)
    return lengths


def drop_overlong(records: list[Record], lengths: list[int], cfg: StageConfig, split: str) -> list[Record]:
    """Never truncate through image tokens: an over-long sample is an error naming it, or skipped if configured."""
    too_long = [(r, n) for r, n in zip(records, lengths, strict=True) if n > cfg.max_seq_len]
    if too_long and cfg.on_overlong == "error":
        first, n = too_long[0]
        raise ConfigError(f"{first.source}: record {first.id!r} is {n} tokens, over max_seq_len={cfg.max_seq_len} "
                          f"({len(too_long)} such in {split}); raise max_seq_len, lower max_pixels, or set "
                          "on_overlong: skip")
    if too_long:
        print_main(f"Skipped {len(too_long)} {split} samples over max_seq_len={cfg.max_seq_len}: "
                   + ", ".join(r.id for r, _ in too_long[:10]) + (" ..." if len(too_long) > 10 else ""))
    keep = {id(r) for r, n in zip(records, lengths, strict=True) if n <= cfg.max_seq_len}
    return [r for r in records if id(r) in keep]


def check_split(path: str, processor, cfg: StageConfig, split: str) -> tuple[list[Record], list[int], list[str]]:
    """A split's records, every image decoded once; bad records stop the run (listed) or are skipped (counted), and
    so do over-long samples (on_bad_record, on_overlong of `cfg`, the StageConfig). Returns (the records kept, their
    lengths in tokens, one `file:line: problem` per record skipped as bad)."""
    records, problems = read_records(path, cfg.system_prompt, cfg.allow_images_outside_data_dir, cfg.columns,
                                     dataset_image_dir(cfg), cfg.question_type)
    sizes, image_problems = inspect_images(records, split, image_check_cache(cfg))
    problems += image_problems
    if problems and cfg.on_bad_record == "error":
        raise bad_records_error(path, problems)
    if problems:
        records = [r for r in records if not r.image or r.image in sizes]  # bad lines never became records
        print_main(f"Skipped {len(problems)} bad {split} record(s) (on_bad_record: skip):\n"
                   + "\n".join(f"  {p}" for p in problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    if not records:
        raise ConfigError(f"{path}: no usable records")
    lengths = sample_lengths(records, processor, cfg, sizes)
    kept = drop_overlong(records, lengths, cfg, split)
    if not kept:
        raise ConfigError(f"{path}: every sample is over max_seq_len={cfg.max_seq_len}")
    print_main(f"Loaded {split} from {path}:")
    print_main("\n".join("  " + line for line in describe_split(split, records, sizes, lengths, cfg)))
    return kept, [n for n in lengths if n <= cfg.max_seq_len], problems
