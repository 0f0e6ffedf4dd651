"""The layout holds: the helpers in curriculum/ never import the scripts, the trainer never imports vqa_eval.py,
and nothing imports in a circle. Read from the source (ast), no module is run."""

import ast

from conftest import REPO

SCRIPTS = {"train_qlora_qwen3vl", "vqa_eval", "verify_exp4_fix", "export_merged"}


def imported_modules(path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from curriculum import faults`
    return found


def project_imports() -> dict[str, set[str]]:
    """{module: the project modules it imports}, for the scripts and curriculum/."""
    files = {p.stem: p for p in REPO.glob("*.py")} | {f"curriculum.{p.stem}": p
                                                       for p in (REPO / "curriculum").glob("*.py")}
    return {name: imported_modules(path) & set(files) for name, path in files.items()}


def test_the_helpers_never_import_the_scripts():
    graph = project_imports()
    assert {m: deps & SCRIPTS for m, deps in graph.items() if m.startswith("curriculum.") and deps & SCRIPTS} == {}
    assert "vqa_eval" not in graph["train_qlora_qwen3vl"]


def test_nothing_imports_in_a_circle():
    graph = project_imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})) for dep in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []

