"""What the README shows is what the code does: the config reference is generated from the dataclasses, and the
demo lines it quotes are printed by a fresh run of the demo's quick path."""

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
    readme = (REPO / "README.md").read_text()
    assert config_reference.readme_with_table(readme) == readme, "run: python docs/config_reference.py"
    rows = re.findall(r"^\| `([\w.]+)` \|", config_reference.table(), re.M)
    assert "lora.target_modules" in rows and "liger_kernels" in rows and len(rows) == len(set(rows))


def quoted_demo_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index(DEMO_MARK):].split("```")[1]
    return [line.rstrip() for line in block.strip().splitlines()]


@pytest.mark.slow
def test_the_demo_quick_path_prints_every_line_the_readme_quotes(tmp_path):
    """`bash demo.sh --set max_steps=10` in a fresh copy of the project (the tiny model built there, as on a new
    machine): every quoted line is printed, character for character."""
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("demo.sh", "train_qlora_qwen3vl.py", "vqa_eval.py", "verify_exp4_fix.py", "tiny_qwen3vl.py"):
        shutil.copy(REPO / name, fresh)
    for name in ("curriculum", "configs", "data"):
        shutil.copytree(REPO / name, fresh / name, ignore=shutil.ignore_patterns("__pycache__", "*_x10.jsonl"))
    result = subprocess.run(["bash", "demo.sh", "--set", "max_steps=10"], cwd=fresh, capture_output=True, text=True,
                            timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = {line.rstrip() for line in result.stdout.replace("\r", "\n").splitlines()}
    missing = [line for line in quoted_demo_lines() if line not in printed]
    assert not missing, "README quotes lines the demo does not print:\n" + "\n".join(missing)
