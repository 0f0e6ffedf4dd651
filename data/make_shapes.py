"""Generate the sample curriculum: synthetic scenes of shapes and VQA questions of three types.

    python data/make_shapes.py            # rewrites data/stage{1,2,3}/{train,dev,test}.jsonl and images/

Deterministic (seeded), so the committed files are reproducible. Difficulty rises by stage:
  stage 1: 1-2 large objects, well-separated colours, no overlap
  stage 2: 3-5 objects, overlap allowed (occlusion), a wider palette
  stage 3: 5-8 smaller objects, overlap, close colours (dark/light pairs) and two sizes to tell apart
Question types: single_choice (the colour of a shape / the shape of a colour), numeric (how many of
a shape) and multi_label (which colours / shapes appear).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle"]
BASE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
WIDE_COLORS = {**BASE_COLORS, "purple": (140, 60, 180), "orange": (245, 140, 20)}
CLOSE_COLORS = {**WIDE_COLORS, "dark red": (130, 20, 20), "pink": (245, 150, 170), "dark blue": (20, 30, 110),
                "light blue": (120, 180, 245)}
STAGES = {
    1: dict(n_objects=(1, 2), size=(60, 80), overlap=False, colors=BASE_COLORS),
    2: dict(n_objects=(3, 5), size=(40, 60), overlap=True, colors=WIDE_COLORS),
    3: dict(n_objects=(5, 8), size=(24, 44), overlap=True, colors=CLOSE_COLORS),
}
SPLITS = {"train": 200, "dev": 40, "test": 40}
IMAGE_SIZE = 224
LETTERS = "ABCDEF"


def draw_scene(rng: random.Random, spec: dict) -> tuple[Image.Image, list[dict]]:
    """A light background with shapes; returns the image and the objects drawn (back to front)."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    objects, boxes = [], []
    for _ in range(rng.randint(*spec["n_objects"])):
        for _attempt in range(50):
            size = rng.randint(*spec["size"])
            x, y = rng.randint(4, IMAGE_SIZE - size - 4), rng.randint(4, IMAGE_SIZE - size - 4)
            box = (x, y, x + size, y + size)
            clear = all(box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3] for b in boxes)
            if spec["overlap"] or clear:
                break
        shape, color = rng.choice(SHAPES), rng.choice(list(spec["colors"]))
        rgb = spec["colors"][color]
        if shape == "circle":
            draw.ellipse(box, fill=rgb)
        elif shape == "square":
            draw.rectangle(box, fill=rgb)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
        boxes.append(box)
        objects.append({"shape": shape, "color": color})
    return img, objects


def choice_options(rng: random.Random, correct: str, pool: list[str], n: int = 4) -> tuple[list[str], str]:
    options = [correct] + rng.sample([p for p in pool if p != correct], min(n - 1, len(pool) - 1))
    rng.shuffle(options)
    return options, LETTERS[options.index(correct)]


def make_question(rng: random.Random, objects: list[dict], spec: dict) -> dict:
    """One question about the scene, of a random type; answers always follow from `objects`."""
    colors, shapes = list(spec["colors"]), SHAPES
    kind = rng.choice(["single_choice", "numeric", "multi_label"])
    if kind == "single_choice":
        unique_shapes = [s for s in shapes if sum(o["shape"] == s for o in objects) == 1]
        if unique_shapes:
            shape = rng.choice(unique_shapes)
            color = next(o["color"] for o in objects if o["shape"] == shape)
            options, answer = choice_options(rng, color, colors)
            return dict(question=f"What color is the {shape}?", type=kind, options=options, answer=answer)
        count = {s: sum(o["shape"] == s for o in objects) for s in shapes}
        most = max(count.values())
        if list(count.values()).count(most) == 1:
            shape = max(count, key=count.get)
            options, answer = choice_options(rng, shape, shapes, n=3)
            return dict(question="Which shape appears most often?", type=kind, options=options, answer=answer)
        kind = "numeric"
    if kind == "numeric":
        shape = rng.choice(shapes)
        n = sum(o["shape"] == shape for o in objects)
        return dict(question=f"How many {shape}s are in the image?", type=kind, options=None, answer=str(n))
    present = sorted({o["color"] for o in objects})
    absent = [c for c in colors if c not in present]
    options = rng.sample(present, min(len(present), 3))
    options += rng.sample(absent, min(len(absent), 5 - len(options)))
    rng.shuffle(options)
    answer = [LETTERS[i] for i, c in enumerate(options) if c in present]
    return dict(question="Which of these colors appear in the image?", type=kind, options=options, answer=answer)


def generate(out_root: Path, seed: int = 0) -> None:
    for stage, spec in STAGES.items():
        stage_dir = out_root / f"stage{stage}"
        (stage_dir / "images").mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed * 1000 + stage)
        for split, n in SPLITS.items():
            lines = []
            for i in range(n):
                img, objects = draw_scene(rng, spec)
                name = f"images/{split}_{i:04d}.png"
                img.save(stage_dir / name, optimize=True)
                q = make_question(rng, objects, spec)
                lines.append(json.dumps({"id": f"s{stage}-{split}-{i:04d}", "image": name, **q}))
            (stage_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"stage {stage}: " + ", ".join(f"{n} {s}" for s, n in SPLITS.items()) + f" -> {stage_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(Path(args.out), args.seed)
