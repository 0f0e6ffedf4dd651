"""The static check of a training recipe, and the record of what trained a stage.

The check parses the script (ast: comments and strings do not count) and follows the branch that continues a
previous stage's adapter (an `if` on something named prev_checkpoint), into the script's own functions it calls: it
must reopen the adapter with `PeftModel.from_pretrained(..., is_trainable=True)` and reach no merge_and_unload, no
second prepare_model_for_kbit_training and no get_peft_model.

A stage records, when it trains, the recipe file's SHA-256 and this check's result on it (`trained_by`, in its
stage_metrics.json), so that the verifier judges a stage by the code that trained it, and says whether today's recipe
is still that file. `verify_exp4_fix.py --script PY` runs the check on a script file.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from curriculum.hashing import sha256_file

FORBIDDEN_IN_CONTINUE_BRANCH = ("merge_and_unload", "prepare_model_for_kbit_training", "get_peft_model")
HELPERS_DIR = Path(__file__).resolve().parent  # curriculum/: what the recipe calls


@dataclass(frozen=True)
class StaticCheck:
    passed: bool
    detail: str  # what was found: the problems with their line numbers, or what the branch does


def _mentions_prev_checkpoint(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and "prev_checkpoint" in n.id)
               or (isinstance(n, ast.Attribute) and "prev_checkpoint" in n.attr) for n in ast.walk(node))


def _called_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _reachable_calls(body: list[ast.stmt], functions: dict[str, ast.FunctionDef], seen: set[str]) -> list[ast.Call]:
    """Calls in `body` and, transitively, in the module's functions that it calls by name."""
    calls = [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Call)]
    for call in list(calls):
        fname = _called_name(call)
        if fname in functions and fname not in seen:
            seen.add(fname)
            calls += _reachable_calls(functions[fname].body, functions, seen)
    return calls


def _is_trainable_true(call: ast.Call) -> bool:
    return any(k.arg == "is_trainable" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def static_check(source: str, filename: str = "<script>") -> StaticCheck:
    """The check on a script's source. Raises SyntaxError if it does not parse."""
    tree = ast.parse(source, filename=filename)
    functions = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    branches = [n for n in ast.walk(tree) if isinstance(n, ast.If) and _mentions_prev_checkpoint(n.test)]
    continuing = []
    for branch in branches:
        calls = _reachable_calls(branch.body, functions, set())
        if any(_called_name(c) == "from_pretrained" and _is_trainable_true(c) or
               _called_name(c) == "from_pretrained" and "Peft" in ast.unparse(c.func) for c in calls):
            continuing.append((branch, calls))
    if not continuing:
        return StaticCheck(False, "no `if ...prev_checkpoint...` branch that calls PeftModel.from_pretrained")
    problems = []
    for branch, calls in continuing:
        for call in calls:
            fname = _called_name(call)
            if fname in FORBIDDEN_IN_CONTINUE_BRANCH:
                problems.append(f"line {call.lineno}: {fname}() in the prev_checkpoint branch (line {branch.lineno})")
            if fname == "from_pretrained" and "Peft" in ast.unparse(call.func) and not _is_trainable_true(call):
                problems.append(f"line {call.lineno}: PeftModel.from_pretrained without is_trainable=True")
    if problems:
        return StaticCheck(False, "; ".join(problems))
    return StaticCheck(True, "the prev_checkpoint branch reopens the adapter with is_trainable=True; no "
                             "merge_and_unload, second k-bit preparation or get_peft_model in it")


def helpers_sha256(helpers_dir: Path = HELPERS_DIR) -> str:
    """One SHA-256 over the helpers' sources (curriculum/*.py, by name and content): the code the recipe calls."""
    h = hashlib.sha256()
    for path in sorted(helpers_dir.glob("*.py")):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def trained_by(recipe: Path) -> dict:
    """stage_metrics.json's `trained_by`: the recipe file (its path and SHA-256), the static check's result on it,
    the helpers' SHA-256, and the script Python ran (`run_as`: the recipe itself, unless something that imports it,
    such as a test fixture, ran it), read when the stage starts."""
    recipe = recipe.resolve()
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        check = static_check(recipe.read_text(), str(recipe))
        sha = sha256_file(recipe)
    except (OSError, SyntaxError) as err:  # a record, not a reason to stop training
        check, sha = StaticCheck(False, f"the recipe did not read: {err}"), None
    return {"recipe": str(recipe), "sha256": sha, "static_check": {"passed": check.passed, "detail": check.detail},
            "helpers_sha256": helpers_sha256(), "run_as": str(Path(main).resolve()) if main else None}
