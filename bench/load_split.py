"""Time to load a split before training (parse, decode every image to find broken ones, count tokens), for a
first stage and for a later stage or rerun over the same images (cache_image_checks remembers the clean ones).

    python bench/load_split.py --ckpt /tmp/q8b --out OUT [--images 2000] [--px 640x480]

Writes OUT/load_split.json. The images are distinct random JPEGs (camera-like: a decode costs what a real one
does), one question each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_qlora_qwen3vl as tq  # noqa: E402
from curriculum.base_model import load_processor  # noqa: E402
from curriculum.config import StageConfig  # noqa: E402


def make_split(root: Path, n: int, width: int, height: int) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    with open(root / "train.jsonl", "w") as f:
        for i in range(n):
            if not (root / f"{i}.jpg").is_file():  # a shifted copy of one noise image: distinct files, quick to make
                Image.fromarray(np.roll(base, i, axis=1)).save(root / f"{i}.jpg", quality=90)
            f.write(json.dumps({"id": str(i), "image": f"{i}.jpg", "question": "How many red squares are there?",
                                "type": "numeric", "answer": i % 7}) + "\n")
    return root / "train.jsonl"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="/tmp/q8b")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--px", default="640x480")
    args = p.parse_args()
    width, height = map(int, args.px.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/load_split_bench")
    train_file = make_split(work / "data", args.images, width, height)
    shutil.rmtree(work / "curriculum", ignore_errors=True)
    result = {"images": args.images, "px": args.px, "cpus": os.cpu_count()}
    processor = None
    for label, stage, cache in (("first stage", "stage1", True), ("next stage, same images", "stage2", True),
                                ("cache_image_checks: false", "stage3", False)):
        cfg = StageConfig(output_dir=str(work / "curriculum" / stage), train_file=str(train_file),
                          model_name_or_path=args.ckpt, batch_size=1, cache_image_checks=cache)
        processor = processor or load_processor(args.ckpt, cfg)
        t = time.perf_counter()
        tq.load_split(str(train_file), processor, cfg, "train")
        result[label] = round(time.perf_counter() - t, 2)
        print(json.dumps({label: result[label]}), flush=True)
    (out / "load_split.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
