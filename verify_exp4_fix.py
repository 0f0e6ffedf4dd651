"""Prove that a saved curriculum stage continued the same LoRA adapter, and say plainly what is wrong if not.

    python verify_exp4_fix.py models/exp4_curriculum/stage2 [--config configs/exp4_stage2.yaml]
                              [--base PATH_OR_ID] [--tolerance 0.10] [--skip-load] [--json] [--debug]
    python verify_exp4_fix.py --curriculum models/exp4_curriculum     # every stage, in order
    python verify_exp4_fix.py --script train_qlora_qwen3vl.py          # the static check of a script file

Each check prints one line: `✓ name: ...`, `✗ name: ...` (with the reason) or `- name: not run (...)`.
Exit 0 when no check failed, 1 when any failed, 2 on bad usage. A check that cannot run is never a pass.
Each check runs on its own: a stage damaged in a way that makes one check raise fails that check, with the error in
one line (the traceback with --debug), and the other checks still run. A stage's checks read its own files and the
base it names: the code that trained it is judged by what the stage recorded of it (`trained by`), and today's
script is only compared with that; `--script` checks a script file itself.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import train_qlora_qwen3vl as tq
from curriculum import forgetting
from curriculum.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_file_problems,
    adapter_tensors_sha256,
    extra_adapters,
    file_adapter_sha256,
    lora_mismatches,
    processes_ended_apart_from,
    read_adapter_file,
    read_adapter_lora,
)
from curriculum.base_model import resolve_model_path
from curriculum.config import LoraSettings, StageConfig, load_config
from curriculum.errors import ConfigError, CurriculumError
from curriculum.hashing import sha256_file
from curriculum.lineage import Lineage, saved_stage_lineage
from curriculum.recipe_check import helpers_sha256, static_check
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS

PASS, FAIL, NOT_RUN = "pass", "fail", "not run"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
NO_METRICS = f"no readable {STAGE_METRICS} (see stage record)"


class UsageError(Exception):
    """Bad command line, a missing directory, or a --config or --script that does not read: exit 2. (A stage's own
    files that do not read are a damaged stage: a failed check.)"""


@dataclass
class Check:
    name: str
    status: str
    detail: str
    stage_dir: str = ""
    traceback: str = ""
    """Where the check raised (a damage no check foresaw); printed with --debug only."""

    def line(self) -> str:
        mark = {PASS: "✓", FAIL: "✗", NOT_RUN: "-"}[self.status]
        return f"{mark} {self.name}: " + (f"not run ({self.detail})" if self.status == NOT_RUN else self.detail)


def one_line(err: Exception, limit: int = 300) -> str:
    """An exception as one line of the report: its type and message, whitespace folded, cut at `limit`."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# What a stage recorded
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class StageRecord:
    """What a stage recorded: its metrics and resolved config, None where absent or unreadable (then `problems`
    says why; a stage made elsewhere may have neither file)."""
    metrics: dict | None
    config: StageConfig | None
    problems: list[str] = field(default_factory=list)


def read_stage(stage_dir: Path) -> StageRecord:
    """The stage's metrics and resolved config; a file that does not read is a problem of the stage, not an error."""
    record = StageRecord(None, None)
    if (stage_dir / STAGE_METRICS).is_file():
        try:
            metrics = json.loads((stage_dir / STAGE_METRICS).read_text())
        except ValueError as err:  # not JSON, or not even text
            record.problems.append(f"{STAGE_METRICS} is not valid JSON ({err})")
        else:
            if isinstance(metrics, dict):
                record.metrics = metrics
            else:
                record.problems.append(f"{STAGE_METRICS} holds a JSON {type(metrics).__name__}, not an object")
    if (stage_dir / RESOLVED_CONFIG).is_file():
        try:
            record.config = load_config(stage_dir / RESOLVED_CONFIG)
        except ConfigError as err:
            record.problems.append(" ".join(str(err).split()))
    return record


# ---------------------------------------------------------------------------------------------------------------------
# The checks; each returns a Check, and one that raises anyway (damage it did not foresee) fails alone: run_isolated
# ---------------------------------------------------------------------------------------------------------------------


def check_adapter_files(stage_dir: Path) -> Check:
    name = "adapter files"
    pickles = sorted(p.name for p in stage_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return Check(name, FAIL, f"pickled files refused, not loaded: {', '.join(pickles)} (weights must be "
                                 "safetensors)")
    nested = extra_adapters(stage_dir)
    if nested:
        return Check(name, FAIL, f"{stage_dir} holds more than one adapter (also: {', '.join(nested)})")
    if not (stage_dir / ADAPTER_CONFIG).is_file():
        hint = " (it holds a full model: merged instead of saved as an adapter?)" \
            if (stage_dir / "model.safetensors").is_file() or (stage_dir / "config.json").is_file() else ""
        return Check(name, FAIL, f"no {ADAPTER_CONFIG} in {stage_dir}{hint}")
    try:
        saved_config = json.loads((stage_dir / ADAPTER_CONFIG).read_text())
    except ValueError as err:  # not JSON, or not even text
        return Check(name, FAIL, f"{ADAPTER_CONFIG} is not valid JSON ({err})")
    if not isinstance(saved_config, dict):
        return Check(name, FAIL, f"{ADAPTER_CONFIG} holds a JSON {type(saved_config).__name__}, not an object")
    if not (stage_dir / ADAPTER_WEIGHTS).is_file():
        return Check(name, FAIL, f"no {ADAPTER_WEIGHTS} in {stage_dir}")
    try:
        tensors = read_adapter_file(stage_dir)
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        return Check(name, FAIL, f"{ADAPTER_WEIGHTS} is unreadable (truncated or corrupt?): "
                                 f"{' '.join(str(err).split())}")
    if not tensors:
        return Check(name, FAIL, f"{ADAPTER_WEIGHTS} holds no tensors: an empty adapter was saved (as the Trainer "
                                 "does under FSDP with peft's own filter)")
    not_lora = [k for k in tensors if "lora_A" not in k and "lora_B" not in k]
    if not_lora:
        return Check(name, FAIL, f"{ADAPTER_WEIGHTS} holds {len(not_lora)} non-LoRA tensors, e.g. "
                                 f"{not_lora[:2]} (a merged or full model, not an adapter)")
    return Check(name, PASS, f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} ({len(tensors)} LoRA tensors, "
                             "safetensors only)")


def check_adapter_shapes(stage_dir: Path, saved_config: StageConfig | None) -> Check:
    """The tensors' ranks and modules against adapter_config.json and the stage's resolved_config.yaml: the cheap
    way to name a hand-edited or mixed-up config, which the model load reports only as a size mismatch."""
    name = "adapter shapes"
    problems = adapter_file_problems(stage_dir, saved_config.lora if saved_config else None, RESOLVED_CONFIG)
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    saved = read_adapter_lora(stage_dir)
    against = f"{ADAPTER_CONFIG} and {RESOLVED_CONFIG}" if saved_config else ADAPTER_CONFIG
    return Check(name, PASS, f"the tensors have rank {saved['r']} on {','.join(saved['target_modules'])}, as "
                             f"{against} say")


def check_stage_record(stage_dir: Path, record: StageRecord) -> Check:
    """stage_metrics.json and resolved_config.yaml are there, read, and describe the same stage. The trainer writes
    both with every finished stage, so one missing or from elsewhere is a damaged stage."""
    name = "stage record"
    if record.problems:
        return Check(name, FAIL, "; ".join(record.problems))
    metrics, config = record.metrics, record.config
    if metrics is None and config is None:
        return Check(name, NOT_RUN, f"no {STAGE_METRICS} and no {RESOLVED_CONFIG} (a stage made elsewhere?)")
    if metrics is None:
        return Check(name, FAIL, f"no {STAGE_METRICS} beside {RESOLVED_CONFIG}: the trainer writes both with "
                                 "every finished stage (lost, or copied without it?)")
    if config is None:
        return Check(name, FAIL, f"no {RESOLVED_CONFIG} beside {STAGE_METRICS}: the trainer writes both with "
                                 "every finished stage (lost, or copied without it?)")
    recorded = {"stage": (metrics.get("stage"), config.stage),
                "model_name_or_path": (metrics.get("model_name_or_path"), config.model_name_or_path),
                "lora": (metrics.get("lora"), asdict(config.lora))}
    differ = [f"{key}: {STAGE_METRICS} says {in_metrics!r}, {RESOLVED_CONFIG} says {in_config!r}"
              for key, (in_metrics, in_config) in recorded.items() if in_metrics != in_config]
    if differ:
        return Check(name, FAIL, "; ".join(differ) + f" (a {STAGE_METRICS} from another stage?)")
    return Check(name, PASS, f"stage {config.stage}: {STAGE_METRICS} and {RESOLVED_CONFIG} agree on stage, "
                             "base model and LoRA settings")


def check_lora_config(stage_dir: Path, expected: LoraSettings | None, source: str) -> Check:
    name = "LoRA config"
    if expected is None:
        return Check(name, NOT_RUN, "no --config and no resolved config saved with the stage")
    diffs = lora_mismatches(expected, read_adapter_lora(stage_dir))
    if diffs:
        return Check(name, FAIL, "; ".join(d.replace("the YAML says", f"{source} says") for d in diffs))
    return Check(name, PASS, f"r={expected.r}, alpha={expected.alpha}, dropout={expected.dropout}, "
                             f"targets={','.join(expected.target_modules)} as in {source}")


def lora_b_all_zero(tensors: dict) -> bool:
    return all(not t.abs().sum().item() for k, t in tensors.items() if "lora_B" in k)


def check_lineage(stage_dir: Path, metrics: dict | None, lineage: Lineage) -> Check:
    """The stage started from exactly the previous stage's adapter (`lineage`, from its record), and trained it."""
    name = "lineage"
    if metrics is None:
        return Check(name, NOT_RUN, NO_METRICS)
    tensors = read_adapter_file(stage_dir)
    if lora_b_all_zero(tensors):
        return Check(name, FAIL, "every LoRA B matrix is zero: an untrained, fresh adapter was saved")
    saved_sha = adapter_tensors_sha256(tensors)
    if metrics.get("saved_adapter_tensors_sha256") not in (None, saved_sha):
        return Check(name, FAIL, "the adapter on disk is not the one the stage saved (its hash changed since)")
    views = metrics.get("processes") or []  # several processes (DDP): each hashed the adapter it ended with
    if processes_ended_apart_from(views, saved_sha):
        return Check(name, FAIL, f"the {len(views)} processes did not all end with the saved adapter: they trained "
                                 "apart, and the file holds only one of them")
    on = f" on {len(views)} processes" if len(views) > 1 else ""
    if not metrics.get("prev_checkpoint"):
        return Check(name, PASS, f"stage {metrics.get('stage')}: a new adapter, trained{on} (B matrices non-zero)")
    prev = lineage.folder  # where the stage recorded it, or beside it if the curriculum moved
    start_sha = metrics.get("start_adapter_file_sha256")
    if not start_sha:
        return Check(name, FAIL, "the stage recorded no hash of the adapter it started from")
    if prev is None:
        return Check(name, NOT_RUN, f"previous stage {metrics['prev_checkpoint']} is gone (and is not beside this "
                                    "stage); cannot compare")
    prev_sha = lineage.adapter_file_sha256
    if start_sha != prev_sha:
        return Check(name, FAIL, f"started from weights {start_sha[:12]}..., but {prev} holds {prev_sha[:12]}...: "
                                 "not the previous stage's adapter")
    # The file was right, but were its weights the ones in the model? (A fresh adapter made beside it is not.)
    loaded_sha = metrics.get("start_adapter_tensors_sha256")
    if loaded_sha != file_adapter_sha256(prev):
        return Check(name, FAIL, f"the weights in the model at the first step ({str(loaded_sha)[:12]}...) were not "
                                 f"{prev}'s adapter: not the previous stage's adapter (a fresh one?)")
    if saved_sha == metrics.get("start_adapter_tensors_sha256"):
        return Check(name, FAIL, "the saved adapter equals the one it started from: it did not train "
                                 "(frozen: reloaded without is_trainable=True?)")
    return Check(name, PASS, f"started from exactly {prev}'s adapter (sha256 {prev_sha[:12]}...) and trained it{on}")


def check_continuity(metrics: dict | None, lineage: Lineage, tolerance: float) -> Check:
    """The first loss of the stage against the previous stage's last (its record, as `lineage` found it; else the
    value this stage recorded of it)."""
    name = "continuity"
    if metrics is None:
        return Check(name, NOT_RUN, NO_METRICS)
    if not metrics.get("prev_checkpoint"):
        return Check(name, NOT_RUN, "stage 1 has no previous stage")
    prev_final = lineage.previous_metrics.get("final_eval_loss", metrics.get("previous_final_eval_loss"))
    first = metrics.get("first_eval_loss")
    if first is None or prev_final is None:
        return Check(name, NOT_RUN, "no eval loss recorded (no eval_file?)")
    jump = abs(first - prev_final) / prev_final
    detail = (f"first_eval_loss {first:.4f} vs previous final_eval_loss {prev_final:.4f} "
              f"({jump:.1%}, tolerance {tolerance:.0%})")
    if jump > tolerance:
        return Check(name, FAIL, detail + ": the stage restarted instead of continuing")
    return Check(name, PASS, detail)


def check_replay(metrics: dict, lineage: Lineage) -> Check:
    """A stage that replayed earlier stages' training records (replay.fraction): replay is no new data source. Every
    replayed stage is in this stage's lineage, and the records came from the very file (by SHA-256) that stage
    recorded training on. Only for stages that recorded replay."""
    name = "replay"
    record = metrics["replay"]
    if lineage.folder is None:  # where the stage recorded it, or beside it if the curriculum moved
        return Check(name, NOT_RUN, f"previous stage {metrics.get('prev_checkpoint')} is gone (and is not beside "
                                    "this stage); cannot compare the replayed files with what the stages trained on")
    problems = forgetting.replay_problems(record, lineage.chain)
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    sources = " and ".join(f"stage {e['stage']} ({e['records']} of {e['pool']} from {e['train_file']}, sha256 "
                           f"{e['sha256'][:12]}...)" for e in record["sources"])
    total = record["own_records"] + record["replayed_records"]
    return Check(name, PASS, f"{record['replayed_records']} of {total} training records ({record['share']:.1%}) "
                             f"replayed from {sources}: the data those stages of the lineage trained on, by SHA-256, "
                             "not a new source")


def is_missing_local_path(name_or_path: str | None) -> bool:
    """A base named by a local path that is not there. A hub id (`org/name`, one slash at most) may be fetched or
    cached elsewhere, so it is left to the load."""
    if not name_or_path:
        return False
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(("./", "../")) or name_or_path.count("/") > 1
    return looks_local and not Path(name_or_path).exists()


def check_base_model(metrics: dict | None, config: StageConfig | None, base: str | None) -> Check:
    name = "base model"
    if metrics is None:
        return Check(name, NOT_RUN, NO_METRICS)
    problems = []
    if is_missing_local_path(base or metrics.get("model_name_or_path")):
        problems.append(f"base {base} (--base) does not exist" if base else
                        f"the stage trained on {metrics.get('model_name_or_path')}, which no longer exists (moved? "
                        "pass --base with where it is now)")
    if base and base != metrics.get("model_name_or_path"):
        problems.append(f"--base {base} but the stage trained on {metrics.get('model_name_or_path')}")
    if config is not None:
        if config.model_name_or_path != metrics.get("model_name_or_path"):
            problems.append(f"the config names base {config.model_name_or_path}, the stage trained on "
                            f"{metrics.get('model_name_or_path')}")
        recorded = metrics.get("quantization", {})
        problems += [f"quantization.{k}: the config says {v!r}, the stage recorded {recorded.get(k)!r}"
                     for k, v in asdict(config.quantization).items() if recorded.get(k) != v]
    if problems:
        return Check(name, FAIL, "; ".join(problems))
    q = metrics.get("quantization", {})
    return Check(name, PASS, f"{metrics.get('model_name_or_path')}, 4-bit {q.get('quant_type')}, compute "
                             f"{q.get('compute_dtype')}, double quant {q.get('double_quant')}")


def check_reopened_for_training(stage_dir: Path, metrics: dict | None, config: StageConfig | None,
                                base: str | None) -> Check:
    """Load the base exactly as the trainer does, reopen the adapter trainable, and inspect it."""
    name = "reopened for training"
    if config is None:
        return Check(name, NOT_RUN, "no config to load the base with (pass --config)")
    model_name = base or (metrics or {}).get("model_name_or_path") or config.model_name_or_path
    # The trainer's own loading steps, with their training-time log lines kept out of the verifier's report.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            model_path = resolve_model_path(model_name)
            model = tq.load_quantized_base(model_path, config)
        except Exception as err:  # no GPU for an 8B, no local copy of a hub id, ...
            return Check(name, NOT_RUN, f"base {model_name} could not be loaded here: {one_line(err)}")
        model = tq.continue_adapter(model, str(stage_dir))
    try:
        count = tq.check_adapter_trainable(model, config.lora)
    except CurriculumError as err:
        return Check(name, FAIL, str(err))
    active = model.active_adapter if isinstance(model.active_adapter, str) else list(model.active_adapter)
    if active != "default":
        return Check(name, FAIL, f"active adapter is {active!r}, expected 'default'")
    base_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    params = {n.replace(".default.", "."): tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    in_file = {n: tuple(t.shape) for n, t in read_adapter_file(stage_dir).items()}
    missing, unexpected = sorted(set(params) - set(in_file)), sorted(set(in_file) - set(params))
    wrong = [n for n in set(params) & set(in_file) if params[n] != in_file[n]]
    if missing or unexpected or wrong:
        return Check(name, FAIL, f"adapter file vs model: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                                 f"wrong shapes {wrong[:3]}")
    return Check(name, PASS, f"one adapter 'default', active; {count:,} trainable LoRA parameters = r x (in + out) "
                             f"of the targeted modules; base trainable {base_trainable}; "
                             f"{len(in_file)} tensors match the model's shapes")


def check_trained_by(metrics: dict | None, today: Path) -> Check:
    """What trained the stage, as the stage recorded it when it trained: the recipe's SHA-256 and the static check's
    result on it (curriculum/recipe_check.py). A stage is judged by the code that trained it: whether today's recipe
    (`today`) and helpers are still that code is said, not judged. A recorded check that failed fails."""
    name = "trained by"
    if metrics is None:
        return Check(name, NOT_RUN, NO_METRICS)
    record = metrics.get("trained_by")
    if not record:
        return Check(name, NOT_RUN, "not recorded (the stage was trained before stages recorded what trained them); "
                                    f"python verify_exp4_fix.py --script {today} checks today's script")
    recipe, sha, static = record.get("recipe"), record.get("sha256"), record.get("static_check") or {}
    trained = f"{recipe} (sha256 {str(sha)[:12]}...)"
    if not static.get("passed"):
        return Check(name, FAIL, f"{trained} failed the static check when the stage trained: {static.get('detail')}")
    now = sha256_file(today) if today.is_file() else None
    script_now = "is that file" if now == sha else f"differs (sha256 {now[:12]}...)" if now else "is not there"
    helpers_now = "the same" if helpers_sha256() == record.get("helpers_sha256") else "changed since"
    run_as = record.get("run_as")
    ran = f"; run as {run_as}, which imported it" if run_as and run_as != recipe else ""
    return Check(name, PASS, f"{trained}: the static check passed on it when the stage trained{ran}; today's {today} "
                             f"{script_now}, curriculum/ {helpers_now}")


def check_training_script(script: Path) -> Check:
    """The static check (curriculum/recipe_check.py) on a script file: today's, or any other."""
    name = "training script"
    try:
        found = static_check(script.read_text(), str(script))
    except (OSError, SyntaxError) as err:
        raise UsageError(f"cannot parse {script}: {err}") from None
    return Check(name, PASS if found.passed else FAIL, f"{script}: {found.detail}")


# ---------------------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------------------


def run_isolated(name: str, check: Callable[[], Check]) -> Check:
    """Run one check on its own. If it raises (the stage is damaged in a way the check does not foresee, such as
    an adapter the model load refuses), that check fails with the error in one line and the others still run."""
    try:
        return check()
    except UsageError:
        raise
    except Exception as err:
        return Check(name, FAIL, f"{one_line(err)} (--debug shows the traceback)", traceback=traceback.format_exc())


def verify_stage(stage_dir: Path, config_path: str | None, base: str | None, tolerance: float,
                 skip_load: bool, today_recipe: Path) -> list[Check]:
    """The stage's checks: each reads the stage's own files (and the base it names); `today_recipe` is named only to
    say whether the recipe that trained the stage is still that file."""
    if not stage_dir.is_dir():
        raise UsageError(f"stage directory not found: {stage_dir}")
    record = read_stage(stage_dir)
    metrics, saved_config = record.metrics, record.config
    # the stages it continued, as its record names them: resolved once, by the first check that needs it (a record
    # damaged so that it raises fails those checks, not the report)
    lineage = functools.cache(lambda: saved_stage_lineage(stage_dir, metrics))
    config, source = saved_config, f"{stage_dir / RESOLVED_CONFIG}"
    if config_path:
        try:
            config, source = load_config(config_path), config_path
        except ConfigError as err:
            raise UsageError(str(err)) from None
    adapter_files = run_isolated("adapter files", lambda: check_adapter_files(stage_dir))

    def needs_adapter(name: str, check: Callable[[], Check]) -> Check:
        # Nothing about the adapter can be read from a stage whose adapter files are broken; the rest still runs.
        return Check(name, NOT_RUN, "the adapter files are broken") if adapter_files.status == FAIL \
            else run_isolated(name, check)

    checks = [
        adapter_files,
        needs_adapter("adapter shapes", lambda: check_adapter_shapes(stage_dir, saved_config)),
        run_isolated("stage record", lambda: check_stage_record(stage_dir, record)),
        needs_adapter("LoRA config", lambda: check_lora_config(stage_dir, config.lora if config else None, source)),
        needs_adapter("lineage", lambda: check_lineage(stage_dir, metrics, lineage())),
        run_isolated("continuity", lambda: check_continuity(metrics, lineage(), tolerance)),
        *([run_isolated("replay", lambda: check_replay(metrics, lineage()))]
          if isinstance(metrics, dict) and metrics.get("replay") else []),  # only a stage that replayed
        run_isolated("base model", lambda: check_base_model(metrics, config if config_path else None, base)),
        Check("reopened for training", NOT_RUN, "--skip-load") if skip_load else
        needs_adapter("reopened for training", lambda: check_reopened_for_training(stage_dir, metrics, config, base)),
        run_isolated("trained by", lambda: check_trained_by(metrics, today_recipe)),
    ]
    for c in checks:
        c.stage_dir = str(stage_dir)
    return checks


TRAINER_WORK_DIRS = (".partial", ".saving", ".replaced")  # <output_dir>.partial etc.: the trainer's, not stages


def curriculum_stages(root: Path) -> list[Path]:
    """The stage directories under `root`, in their recorded stage order. Every directory holding a stage's files
    counts, so a stage that lost its stage_metrics.json, or holds one that does not read, is reported, not skipped."""
    if not root.is_dir():
        raise UsageError(f"curriculum directory not found: {root}")
    stage_files = (STAGE_METRICS, RESOLVED_CONFIG, ADAPTER_CONFIG)
    stages = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.endswith(TRAINER_WORK_DIRS)
              and any((d / f).is_file() for f in stage_files)]
    if not stages:
        raise UsageError(f"{root} holds no stage directories (with {STAGE_METRICS})")

    def recorded_stage(stage_dir: Path) -> float:
        record = read_stage(stage_dir)
        number = (record.metrics or {}).get("stage", record.config.stage if record.config else None)
        return number if isinstance(number, int) else math.inf  # no readable stage number: after the others

    return sorted(stages, key=recorded_stage)


def check_same_lora_across(stages: list[Path]) -> Check:
    configs = {}
    for stage in stages:  # an adapter_config.json that does not read is its own stage's failed check
        with contextlib.suppress(ValueError, AttributeError):
            configs[str(stage)] = read_adapter_lora(stage)
    if len({json.dumps(c, sort_keys=True) for c in configs.values()}) > 1:
        return Check("LoRA config across stages", FAIL, "differs: " + "; ".join(f"{k}: {v}" for k, v in
                                                                                 configs.items()))
    return Check("LoRA config across stages", PASS, f"identical in all {len(configs)} stages")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", nargs="?")
    parser.add_argument("--curriculum", metavar="ROOT", help="verify every stage under ROOT, in order")
    parser.add_argument("--script", metavar="PY", help="statically check this training script (alone, if no stage; "
                                                       "with stages, also the recipe their records are compared with)")
    parser.add_argument("--config", help="stage YAML whose LoRA and quantization settings are expected")
    parser.add_argument("--base", help="base model to load instead of the one the stage recorded")
    parser.add_argument("--tolerance", type=float, default=0.10, help="continuity tolerance (default 0.10)")
    parser.add_argument("--skip-load", action="store_true", help="run only the checks that need no model")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report")
    parser.add_argument("--debug", action="store_true", help="with a check that raised, print where (its traceback)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    today = Path(args.script) if args.script else Path(tq.__file__)  # what the stages' records are compared with
    try:
        if args.script and not today.is_file():
            raise UsageError(f"script not found: {today}")
        if args.curriculum:
            stages = curriculum_stages(Path(args.curriculum))
            checks = [c for s in stages for c in verify_stage(s, None, args.base, args.tolerance, args.skip_load,
                                                              today)]
            checks.append(run_isolated("LoRA config across stages", lambda: check_same_lora_across(stages)))
        elif args.stage_dir:
            checks = verify_stage(Path(args.stage_dir), args.config, args.base, args.tolerance, args.skip_load,
                                  today)
        elif not args.script:
            raise UsageError("give a STAGE_DIR, --curriculum ROOT or --script PY")
        else:
            checks = []
        if args.script:  # the script file's own check, once, apart from the stages' (which read their records)
            checks.append(check_training_script(today))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = sum(c.status == FAIL for c in checks)
    if args.json:
        reported = [{k: v for k, v in asdict(c).items() if k != "traceback" or args.debug} for c in checks]
        print(json.dumps({"ok": failed == 0, "checks": reported}, indent=2))
    else:
        current = None
        for c in checks:
            if c.stage_dir != current and c.stage_dir:
                current = c.stage_dir
                print(f"== {current}")
            print(c.line())
            if args.debug and c.traceback:
                print("    " + c.traceback.rstrip().replace("\n", "\n    "))
        counts = {s: sum(c.status == s for c in checks) for s in (PASS, FAIL, NOT_RUN)}
        print(f"verify: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[NOT_RUN]} not run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
