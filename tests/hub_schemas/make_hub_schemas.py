"""Test data, not product: a few rows in the schemas of four public VQA datasets as the Hugging Face Hub serves them,
and a plain table, written as the parquet splits under tests/hub_schemas/ (committed; the tests never download).

    python tests/hub_schemas/make_hub_schemas.py          # rewrite them (deterministic)

Each schema is copied, column for column and type for type, from the `dataset_info.features` of its dataset card
(the card's README.md on huggingface.co); the rows are made up, over small drawn images:

- scienceqa: lmms-lab/ScienceQA, config ScienceQA-IMG (huggingface.co/datasets/lmms-lab/ScienceQA/blob/main/README.md):
  multiple choice, `choices` a list of texts, `answer` the int8 index of the right one; no id column.
- chartqa: HuggingFaceM4/ChartQA (huggingface.co/datasets/HuggingFaceM4/ChartQA/blob/main/README.md): chart QA,
  `query`, `label` a list of answer texts (numbers as text), `human_or_machine` a class label.
- vqav2: lmms-lab/VQAv2 (huggingface.co/datasets/lmms-lab/VQAv2/blob/main/README.md): free text with ten human
  answers, `answers` a list of {answer, answer_confidence, answer_id}, `multiple_choice_answer` the most common.
- docvqa: lmms-lab/DocVQA, config DocVQA (huggingface.co/datasets/lmms-lab/DocVQA/blob/main/README.md): document
  QA, `questionId` a string, `answers` a list of accepted answer texts (scored with ANLS).
- plain: the most common shape of all, `image`, `question`, `answer` (free text, numbers, lists of names) only.

COLUMNS holds the `columns:` block that makes each trainable (README.md, "Bring a dataset from the Hub").
"""

import io
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SPLITS = {"train": 6, "dev": 3}  # rows per split: enough for a stage of a few steps and a few dev answers

COLUMNS = {
    "plain": {},
    "scienceqa": {"options": "choices"},
    "chartqa": {"question": "query", "references": "label"},
    "vqav2": {"id": "question_id", "answer": "multiple_choice_answer"},
    "docvqa": {"id": "questionId"},
}

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def png(draw_on, name: str, size=(64, 64)) -> dict:
    """An `Image` cell as `datasets` stores one: the PNG's bytes and a file name."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw_on(ImageDraw.Draw(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": name}


def square(colour: str, name: str) -> dict:
    return png(lambda d: d.rectangle([16, 16, 48, 48], fill=COLOURS[colour]), name)


def bars(values: dict, name: str) -> dict:
    def draw(d):
        for i, (colour, value) in enumerate(values.items()):
            d.rectangle([8 + 18 * i, 60 - 3 * value, 20 + 18 * i, 60], fill=COLOURS[colour])
    return png(draw, name)


def page(text: str, name: str) -> dict:
    return png(lambda d: d.text((4, 24), text, fill=(0, 0, 0)), name, size=(96, 64))


def scienceqa(n: int, split: str) -> tuple[dict, list]:
    from datasets import Features, Image, List, Value

    features = Features({"image": Image(), "question": Value("string"), "choices": List(Value("string")),
                         "answer": Value("int8"), "hint": Value("string"), "task": Value("string"),
                         "grade": Value("string"), "subject": Value("string"), "topic": Value("string"),
                         "category": Value("string"), "skill": Value("string"), "lecture": Value("string"),
                         "solution": Value("string")})
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        colour, choices = colours[i % 4], colours[: 2 + i % 3]
        if colour not in choices:
            choices = [*choices[:-1], colour]
        rows.append({"image": square(colour, f"sqa_{split}_{i}.png"), "question": "Which color is the square?",
                     "choices": choices, "answer": choices.index(colour), "hint": "", "task": "closed choice",
                     "grade": "grade2", "subject": "natural science", "topic": "colors", "category": "Color",
                     "skill": "Identify colors", "lecture": "", "solution": f"The square is {colour}."})
    return features, rows


def chartqa(n: int, split: str) -> tuple[dict, list]:
    from datasets import ClassLabel, Features, Image, List, Value

    features = Features({"image": Image(), "query": Value("string"), "label": List(Value("string")),
                         "human_or_machine": ClassLabel(names=["human", "machine"])})
    rows = []
    for i in range(n):
        values = {"red": 4 + i, "green": 10 - i, "blue": 2 + 2 * i}
        query, label = [("What is the value of the red bar?", [str(values["red"])]),
                        ("Which color has the highest bar?", [max(values, key=values.get).title()]),
                        ("Is the green bar taller than the blue bar?", ["Yes" if values["green"] > values["blue"]
                                                                        else "No"])][i % 3]
        rows.append({"image": bars(values, f"chart_{split}_{i}.png"), "query": query, "label": label,
                     "human_or_machine": i % 2})
    return features, rows


def vqav2(n: int, split: str) -> tuple[dict, list]:
    from datasets import Features, Image, List, Value

    features = Features({"question_type": Value("string"), "multiple_choice_answer": Value("string"),
                         "answers": List({"answer": Value("string"), "answer_confidence": Value("string"),
                                          "answer_id": Value("int64")}),
                         "image_id": Value("int64"), "answer_type": Value("string"), "question_id": Value("int64"),
                         "question": Value("string"), "image": Image()})
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        colour = colours[i % 4]
        if i % 2:  # a count: ten people, most of them right
            humans, question, qtype, atype = ["1"] * 7 + ["one"] * 2 + ["2"], "How many squares are there?", \
                "how many", "number"
        else:
            humans = [colour] * 8 + [f"dark {colour}", "white"]
            question, qtype, atype = "What color is the square?", "what color is the", "other"
        answers = [{"answer": a, "answer_confidence": "yes" if j < 8 else "maybe", "answer_id": j + 1}
                   for j, a in enumerate(humans)]
        rows.append({"question_type": qtype, "multiple_choice_answer": humans[0], "answers": answers,
                     "image_id": 1000 + i, "answer_type": atype, "question_id": 1000 * (1 + i) + 7,
                     "question": question, "image": square(colour, f"vqa_{split}_{i}.png")})
    return features, rows


def docvqa(n: int, split: str) -> tuple[dict, list]:
    from datasets import Features, Image, List, Value

    features = Features({"questionId": Value("string"), "question": Value("string"),
                         "question_types": List(Value("string")), "image": Image(), "docId": Value("int64"),
                         "ucsf_document_id": Value("string"), "ucsf_document_page_no": Value("string"),
                         "answers": List(Value("string")), "data_split": Value("string")})
    rows = []
    for i in range(n):
        number, total = f"{1040 + 17 * i}", f"${12 + i}.50"
        question, answers, kinds = [("What is the invoice number?", [number], ["form"]),
                                    ("What is the total?", [total, total.lstrip("$")], ["table/list"]),
                                    ("Who is the invoice from?", ["ACME Corp.", "ACME"], ["layout"])][i % 3]
        rows.append({"questionId": f"{split}-{5000 + i}", "question": question, "question_types": kinds,
                     "image": page(f"ACME Corp.\nInvoice {number}\nTotal {total}", f"doc_{split}_{i}.png"),
                     "docId": 700 + i, "ucsf_document_id": f"xq{800 + i}", "ucsf_document_page_no": "1",
                     "answers": answers, "data_split": split})
    return features, rows


def plain(n: int, split: str) -> tuple[dict, list]:
    from datasets import Features, Image, Value

    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string")})
    colours = list(COLOURS)
    kinds = [lambda c: ("What color is the square?", c),                   # free text
             lambda c: ("How many squares are there?", "1"),                # a number
             lambda c: ("Which colors appear in the image?", f"white, {c}")]  # a list of names
    rows = []
    for i in range(n):
        question, answer = kinds[i % 3](colours[i % 4])
        rows.append({"image": square(colours[i % 4], f"plain_{split}_{i}.png"), "question": question,
                     "answer": answer})
    return features, rows


SCHEMAS = {"plain": plain, "scienceqa": scienceqa, "chartqa": chartqa, "vqav2": vqav2, "docvqa": docvqa}


def tables() -> dict:
    """{(schema, split): (features, rows)}: what the files hold."""
    return {(name, split): make(n, split) for name, make in SCHEMAS.items() for split, n in SPLITS.items()}


def main(out: Path = HERE) -> None:
    from datasets import Dataset

    for (name, split), (features, rows) in tables().items():
        (out / name).mkdir(parents=True, exist_ok=True)
        columns = {key: [r[key] for r in rows] for key in features}
        Dataset.from_dict(columns, features=features).to_parquet(str(out / name / f"{split}.parquet"))
        print(f"wrote {out / name / f'{split}.parquet'} ({len(rows)} rows)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
