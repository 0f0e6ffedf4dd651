"""What a finished stage records about itself: stage_metrics.json (what the stage was, started from, measured and
cost; the next stage, the plots and the verifier read it) and its README.md, the model card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from curriculum import speed
from curriculum.adapter_files import ADAPTER_CONFIG
from curriculum.config import StageConfig
from curriculum.lineage import Lineage
from curriculum.processes import fsdp_enabled
from curriculum.stage_folder import RESOLVED_CONFIG, STAGE_METRICS


def stage_metrics(cfg: StageConfig, lineage: Lineage, trained_by: dict, data, fitted, views: list[dict],
                  patches: dict, final_eval: float | None, dev_metrics: dict | None) -> dict:
    """stage_metrics.json: what the stage was, started from, measured and cost, and what trained it (`trained_by`,
    recipe_check.trained_by); the next stage and the verifier read it. `data` and `fitted` are the recipe's StageData
    and Fit; `views` what each process held."""
    import torch  # for the peak memory; the recipe has it loaded by now

    state, world = fitted.trainer.state, len(views)
    batch_size, grad_accum = fitted.size.batch_size, fitted.size.grad_accum
    return {
        "stage": cfg.stage,
        "model_name_or_path": cfg.model_name_or_path,
        "prev_checkpoint": str(lineage.folder.resolve()) if lineage.continues else None,
        "trainable_params": views[0]["trainable_params"],
        "lora": dataclasses.asdict(cfg.lora),
        "quantization": dataclasses.asdict(cfg.quantization),
        "first_eval_loss": fitted.start.first_eval_loss,
        "first_eval_file": str(Path(data.continuity_file).resolve()) if data.continuity is not None else None,
        "first_eval_loss_own_split": fitted.start.first_eval_loss_own_split,
        "previous_final_eval_loss": lineage.previous_metrics.get("final_eval_loss"),
        "final_eval_loss": final_eval,
        "final_eval_file": str(Path(cfg.eval_file).resolve()) if cfg.eval_file else None,
        "data_files": data.data_files,
        "dev_metrics": dev_metrics,
        "earlier_stages": fitted.watch.records(state.log_history),  # their dev splits, watched (forgetting.py)
        "forgetting": fitted.watch.summary(),
        "replay": data.replay,  # earlier stages' training records mixed in: which, how many, their files' SHA-256
        "train_loss_history": [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e],
        "eval_loss_history": [{"step": e["step"], "loss": e["eval_loss"]}
                              for e in state.log_history if "eval_loss" in e],
        "train_loss": fitted.result.training_loss,
        "global_steps": state.global_step,
        "batch_size_chosen": batch_size if cfg.batch_size == "auto" else None,
        "grad_accum": grad_accum,
        "effective_batch_size": batch_size * grad_accum * world,
        "plan": fitted.plan,  # effective_batch: the plan chosen, and what was measured to choose it
        "num_processes": world,
        "train_samples": len(data.train),
        "train_seconds": round(fitted.train_seconds, 2),
        # steps of this run only: a resumed run timed only what it trained after the resume
        "samples_per_second": round((state.global_step - fitted.resumed_at) * batch_size * grad_accum * world
                                    / max(fitted.train_seconds, 1e-9), 3),
        "resumed_from_step": fitted.resumed_at or None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available()
        else None,
        "start_adapter_file_sha256": lineage.adapter_file_sha256,
        "start_adapter_tensors_sha256": views[0]["start_tensors_sha256"] if lineage.continues else None,
        "optimizer_state": cfg.optimizer_state,
        "speed_patches": speed.describe_speed_patches(patches),
        "versions": speed.versions("torch", "transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel"),
        "trained_by": trained_by,  # the recipe's SHA-256 and its static check, as the stage started
        "bad_records_skipped": {"train": data.train.bad_records, "eval": data.eval.bad_records if data.eval else []},
        "processes": views,  # what each process held before the first step and after the last
        "distributed": "fsdp" if fsdp_enabled() else "ddp" if world > 1 else None,
    }


def loss_cell(value: float | None) -> str:
    """A loss in a model card's table: four decimals, a dash where none was measured."""
    return "–" if value is None else f"{value:.4f}"


def model_card(cfg: StageConfig, lineage: Lineage, metrics: dict, accuracy_table: str | None) -> str:
    """The stage folder's README.md, in place of peft's empty template: the base, the stage and its lineage, the
    data by SHA-256, the losses and the dev accuracy by question type, and the earlier stages' dev splits, watched,
    and what was replayed (earlier_stages_section). `cfg` is the stage's StageConfig."""
    lora, q = cfg.lora, cfg.quantization
    front = ["---", f"base_model: {cfg.model_name_or_path}", "library_name: peft", "pipeline_tag: image-text-to-text",
             "tags:", f"- base_model:adapter:{cfg.model_name_or_path}", "- lora", "- qlora", "- qwen3-vl",
             "- curriculum", "---", ""]
    if lineage.continues:
        started = [f"Continues the adapter saved by the previous stage in `{lineage.prev_checkpoint}` (recorded as "
                   f"`{metrics['prev_checkpoint']}`), reopened for training: the same LoRA weights, trained further.",
                   "", f"- started from: adapter file sha256 `{metrics.get('start_adapter_file_sha256')}`, tensors "
                   f"sha256 `{metrics.get('start_adapter_tensors_sha256')}`"]
    else:
        started = ["A new adapter (B = 0 at the start, so it began as the base model).", ""]
    started.append(f"- saved: adapter file sha256 `{metrics.get('saved_adapter_file_sha256')}`, tensors sha256 "
                   f"`{metrics.get('saved_adapter_tensors_sha256')}`")
    data = ["| split | file | SHA-256 |", "|---|---|---|"] + [f"| {key} | `{entry['path']}` | `{entry['sha256']}` |"
                                                            for key, entry in (metrics.get("data_files") or {}).items()]
    continued = [f"| first_eval_loss, before the first step, on the dev split the previous stage ended on | "
                 f"{loss_cell(metrics.get('first_eval_loss'))} |",
                 f"| previous stage's final_eval_loss there | {loss_cell(metrics.get('previous_final_eval_loss'))} |"]
    losses = ["| loss | value |", "|---|---|", *(continued if lineage.continues else []),
              f"| before the first step, on `{cfg.eval_file}` | "
              f"{loss_cell(metrics.get('first_eval_loss_own_split'))} |",
              f"| final_eval_loss (on `{cfg.eval_file}`) | {loss_cell(metrics.get('final_eval_loss'))} |",
              f"| train_loss, the mean over the stage | {loss_cell(metrics.get('train_loss'))} |"]
    n = (metrics.get("dev_metrics") or {}).get("overall", {}).get("n")
    accuracy = [f"Greedy answers to {n} questions of `{cfg.eval_file}`, parsed and scored as vqa_eval.py does:", "",
                accuracy_table] if accuracy_table else ["Not measured (no eval_file, or eval_questions: 0)."]
    return "\n".join(front + [
        f"# Stage {cfg.stage}: a LoRA adapter for `{cfg.model_name_or_path}`", "",
        f"Stage {cfg.stage} of a curriculum, trained by `train_qlora_qwen3vl.py` with QLoRA: the base frozen in "
        f"4-bit {q.quant_type} (compute {q.compute_dtype}, double quant {q.double_quant}), one LoRA adapter "
        f"(r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, on {', '.join(lora.target_modules)}) trained "
        f"for {metrics.get('global_steps')} optimizer steps at effective batch {metrics.get('effective_batch_size')}, "
        f"lr {cfg.lr:g}. Every setting is in `{RESOLVED_CONFIG}`; every number below is in `{STAGE_METRICS}`.", "",
        "## Base model", "", f"`{cfg.model_name_or_path}`, as the config names it (`{ADAPTER_CONFIG}` records the "
        "same), so the folder names its base wherever it is moved.", "",
        "## Lineage", "", *started, "",
        "## Data", "", f"{metrics.get('train_samples')} training samples.", "", *data, "",
        "## Losses", "", *losses, "",
        "## Dev accuracy by question type", "", *accuracy, "",
        *earlier_stages_section(metrics),
        "## Use", "", "```",
        "python verify_exp4_fix.py THIS_FOLDER                                 # prove the lineage, reopen it",
        "python train_qlora_qwen3vl.py NEXT_STAGE.yaml --set prev_checkpoint=THIS_FOLDER   # continue it",
        "python export_merged.py THIS_FOLDER MERGED_FOLDER --check 20           # a merged bf16 model to serve",
        "```", ""])


def earlier_stages_section(metrics: dict) -> list[str]:
    """The model card's section on earlier stages and replay (none for a stage that has neither)."""
    earlier, replay = metrics.get("earlier_stages") or [], metrics.get("replay")
    if not earlier and not replay:
        return []
    lines = ["## Earlier stages", ""]
    if earlier:
        lines += ["Their dev splits, evaluated during this stage:", "",
                  "| stage | dev split | loss before the first step | at the end | change | accuracy (n) |",
                  "|---|---|---|---|---|---|"]
        for e in earlier:
            overall = (e.get("dev_metrics") or {}).get("overall")
            accuracy = f"{overall['accuracy']:.1%} ({overall['n']})" if overall else "–"
            change = "–" if e.get("change") is None else f"{e['change']:+.1%}"
            lines.append(f"| {e['stage']} | `{e['eval_file']}` | {loss_cell(e.get('loss_at_start'))} | "
                         f"{loss_cell(e.get('final_loss'))} | {change} | {accuracy} |")
        lines.append("")
    if replay:
        lines += [f"Replay: {replay['replayed_records']} of {replay['own_records'] + replay['replayed_records']} "
                  f"training records ({replay['share']:.1%}) are earlier stages' own training records (seed "
                  f"{replay['seed']}):", "", "| stage | file | SHA-256 | records replayed |", "|---|---|---|---|"]
        lines += [f"| {e['stage']} | `{e['train_file']}` | `{e['sha256']}` | {e['records']} of {e['pool']} |"
                  for e in replay["sources"]]
        lines.append("")
    return lines
