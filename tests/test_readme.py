"""What the README shows is what the code does: the config reference (docs/config.md) is generated from the
dataclasses, the sections the code points to exist, and the demo lines it quotes are printed by a fresh run of the
demo."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "docs"))
import config_reference  # noqa: E402

DEMO_MARK = "<!-- demo lines: checked by tests/test_readme.py -->"


def test_the_config_reference_is_the_one_generated_from_the_dataclasses():
    assert (REPO / "docs" / "config.md").read_text() == config_reference.reference(), \
        "run: python docs/config_reference.py"
    rows = re.findall(r"^\| `([\w.]+)` \|", config_reference.table(), re.M)
    assert "lora.target_modules" in rows and "liger_kernels" in rows and len(rows) == len(set(rows))
    assert "| `learning_rate` | this tool calls it 'lr' |" in config_reference.reference()
    assert "docs/config.md" in (REPO / "README.md").read_text()


def test_every_readme_section_the_code_points_to_exists():
    """`README.md, "Evaluation metrics"` in a docstring or a --help is a promise: the section is there."""
    headings = set(re.findall(r"^#+ (.+?)\s*$", (REPO / "README.md").read_text(), re.M))
    pointers = {}
    for path in [*REPO.glob("*.py"), *REPO.glob("curriculum/*.py"), *REPO.glob("bench/*.py")]:
        for name in re.findall(r'README(?:\.md)?,? (?:section )?"([^"]+)"', path.read_text()):
            pointers.setdefault(name, []).append(path.name)
    assert pointers, "no pointer found: the pattern no longer matches how the code names README sections"
    missing = {name: files for name, files in pointers.items() if name not in headings}
    assert not missing, f"README sections named in the code but absent: {missing}"


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_documents_leads_somewhere():
    """README.md and docs/*.md link to each other and to bench/RESULTS.md: each file linked exists, and each
    #anchor names a heading of the file it points into."""
    broken = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, fragment = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
                if fragment not in headings:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def quoted_demo_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(DEMO_MARK):].split("```")[1]
    return [line.rstrip() for line in block.strip().splitlines()]


NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def prints_quoted_line(quoted: str, printed: str) -> bool:
    """`printed` is the line the README quotes: the same text, the same whole numbers, and each decimal number
    within one unit of the last digit the README quotes (`5.6` takes 5.5 to 5.7).

    Trained losses differ in their last digits from one CPU model to another (after 10 steps of stage 1, 10.9931 on
    one machine, 10.9919 on another of the same kind; the gap grows with the steps), so the README rounds them and
    this compares to the rounding. A real change still breaks it: an adapter that restarted instead of continuing
    starts near the untrained 12.64, not at the previous stage's 5.6, and a change of lr, data or masking moves the
    demo's losses by more than 0.1."""
    if NUMBER.sub("#", quoted) != NUMBER.sub("#", printed):
        return False
    for q, p in zip(NUMBER.findall(quoted), NUMBER.findall(printed), strict=True):
        if "." not in q:
            if q != p:
                return False
            continue
        unit = 10.0 ** -len(q.split(".")[1])
        if abs(float(p.replace(",", "")) - float(q.replace(",", ""))) > unit * 1.000001:
            return False
    return True


def test_quoted_lines_compare_to_the_readme_rounding():
    assert prints_quoted_line("final_eval_loss 5.6", "final_eval_loss 5.551022529602051")
    assert not prints_quoted_line("final_eval_loss 5.6", "final_eval_loss 5.386181831359863")
    assert prints_quoted_line("final_eval_loss 10.99", "final_eval_loss 10.993062973022461")
    assert prints_quoted_line("final_eval_loss 10.99", "final_eval_loss 10.991903305053711")  # another CPU model
    assert not prints_quoted_line("final_eval_loss 10.99", "final_eval_loss 11.0012")
    assert not prints_quoted_line("final_eval_loss 10.99", "final_eval_loss 12.6351")  # a restarted adapter
    assert not prints_quoted_line("final_eval_loss 10.99", "first_eval_loss 10.99")
    assert prints_quoted_line("✓ continuity: first_eval_loss 10.99 vs previous final_eval_loss 10.99 (0.0%, tolerance "
                              "10%)", "✓ continuity: first_eval_loss 10.9919 vs previous final_eval_loss 10.9919 "
                              "(0.0%, tolerance 10%)")
    assert not prints_quoted_line("verify: 24 passed, 0 failed", "verify: 23 passed, 1 failed")
    assert not prints_quoted_line("trainable params: 7,168", "trainable params: 14,336")


@pytest.mark.slow
def test_the_demo_prints_every_line_the_readme_quotes(tmp_path):
    """`bash demo.sh` in a fresh copy of the project (the tiny model built there, as on a new
    machine): every quoted line is printed, its numbers to the README's rounding (prints_quoted_line)."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("demo.sh", "train_qlora_qwen3vl.py", "vqa_eval.py", "verify_exp4_fix.py", "tiny_qwen3vl.py"):
        shutil.copy(REPO / name, fresh)
    for name in ("curriculum", "configs", "data"):
        shutil.copytree(REPO / name, fresh / name, ignore=shutil.ignore_patterns("__pycache__", "*_x10.jsonl"))
    result = subprocess.run(["bash", "demo.sh"], cwd=fresh, capture_output=True, text=True,
                            timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = [line.rstrip() for line in result.stdout.replace("\r", "\n").splitlines()]
    missing = [line for line in quoted_demo_lines() if not any(prints_quoted_line(line, p) for p in printed)]
    assert not missing, "README quotes lines the demo does not print:\n" + "\n".join(missing)


def test_the_code_map_names_every_module():
    """docs/code.md, the contributors' map, names every module of curriculum/ and every script: a module added
    without a line there fails here."""
    text = (REPO / "docs" / "code.md").read_text()
    files = [p for p in sorted((REPO / "curriculum").glob("*.py")) if p.name != "__init__.py"]
    files += sorted(REPO.glob("*.py"))
    missing = [str(p.relative_to(REPO)) for p in files if f"{p.name}`" not in text]
    assert not missing, f"docs/code.md does not name: {missing}"
