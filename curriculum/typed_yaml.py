"""YAML mappings into typed dataclasses: an unknown key is named with the closest valid one, a wrong type is named
with what was expected, and every problem of a file is reported at once. `--set a.b=value` overrides go through
the same checks."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from curriculum.errors import ConfigError


def closest_key(key: str, valid: list[str], known_elsewhere: dict[str, str] | None = None) -> str:
    """What to say after an unknown key: this tool's name for a key other tools name so (`learning_rate` -> lr),
    else the closest valid key, else the valid keys."""
    if known_elsewhere and key in known_elsewhere:
        return f": {known_elsewhere[key]}"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(valid)})"


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` if it fits `annotation` (ints are accepted as floats), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for inner in [a for a in args if a is not type(None)]:  # the first that fits (`int | Literal["auto"]`)
            try:
                return check_type(value, inner, where)
            except ConfigError as err:
                problems.append(str(err).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: " + "; or ".join(problems))
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1 is not True here
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            raise ConfigError(f"{where}: expected a list of {args[0].__name__}, got {value!r}")
        return list(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-4` (no dot) as a string; accept what is plainly a number
            return float(value)
        except ValueError:
            pass
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def dataclass_problems(cls: type, data: Any, where: str = "") -> tuple[Any, list[tuple[str, str]]]:
    """Turn a YAML mapping into `cls`, rejecting unknown keys and wrong types. Returns (the instance, or None when
    anything is wrong; every problem as (the key's dotted path, the message naming it)). A class may list the names
    other tools give its keys in a `KNOWN_ELSEWHERE` mapping ({"learning_rate": "this tool calls it 'lr'"})."""
    if not isinstance(data, dict):
        return None, [(where, f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known_elsewhere = getattr(cls, "KNOWN_ELSEWHERE", {})
    problems, values = [], {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            problems.append((path, f"unknown key '{path}'{closest_key(str(key), list(fields), known_elsewhere)}"))
            continue
        if dataclasses.is_dataclass(hints[key]):
            values[key], inner = dataclass_problems(hints[key], value, path)
            problems += inner
            continue
        try:
            values[key] = check_type(value, hints[key], path)
        except ConfigError as err:
            problems.append((path, str(err)))
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    problems += [(f"{where}.{n}" if where else n, f"missing required key '{f'{where}.' if where else ''}{n}'")
                 for n in missing]
    return (None if problems else cls(**values)), problems


def dataclass_from_mapping(cls: type, data: dict, where: str = "") -> Any:
    """dataclass_problems, raising one ConfigError with every problem, a line each."""
    instance, problems = dataclass_problems(cls, data, where)
    if problems:
        raise ConfigError("\n".join(message for _, message in problems))
    return instance


def apply_overrides(data: dict, overrides: list[str]) -> dict[str, str]:
    """Apply `--set a.b=value` overrides to `data` (values parsed as YAML: `--set lr=1e-4`, `--set lora.r=8`).
    Returns {dotted key: the override as typed} of every key set, so that a problem with one is reported as the
    `--set`'s, not the file's."""
    given = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set lr=1e-4")
        dotted, raw = item.split("=", 1)
        *parents, leaf = dotted.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        given[dotted.strip()] = item
    return given


def read_yaml_dataclass(cls: type, path: str | os.PathLike, overrides: list[str] = ()) -> Any:
    """Read a YAML file (safely: no object construction) into `cls`, overrides applied, every key type-checked;
    one ConfigError listing every problem, under the file's name or, for a key given on the command line, under
    `--set`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:\n  - config: expected a mapping of keys, got {type(data).__name__}")
    given = apply_overrides(data, list(overrides))
    instance, problems = dataclass_problems(cls, data)
    if not problems:
        return instance
    def override_of(key: str) -> str | None:  # the --set that gave this key, or a section above it
        parts = key.split(".")
        return next((given[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1)) if k in given), None)

    in_file = [message for key, message in problems if override_of(key) is None]
    on_command_line = [f"--set {override_of(key)}: {message.removeprefix(f'{key}: ')}" for key, message in problems
                       if override_of(key) is not None]
    report = [f"{path}:"] * bool(in_file) + [f"  - {m}" for m in in_file]
    report += ["the command line:"] * bool(on_command_line) + [f"  - {m}" for m in on_command_line]
    raise ConfigError("\n".join(report))


def parse_args(argv: list[str], usage: str = "") -> tuple[str, list[str], bool]:
    """`CONFIG.yaml [--set key=value ...] [--check]`; any other flag is an error. `-h` prints `usage`."""
    config, overrides, check, i = None, [], False, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--set" and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            i += 1
        elif arg.startswith("--set="):
            overrides.append(arg[len("--set="):])
        elif arg == "--check":
            check = True
        elif arg in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        elif arg.startswith("-") or config is not None:
            raise ConfigError(f"unexpected argument {arg!r}; usage: train_qlora_qwen3vl.py CONFIG.yaml "
                              "[--set key=value ...] [--check]")
        else:
            config = arg
        i += 1
    if config is None:
        raise ConfigError("usage: train_qlora_qwen3vl.py CONFIG.yaml [--set key=value ...] [--check]")
    return config, overrides, check
