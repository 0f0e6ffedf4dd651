"""One effective batch under several plans on the GPU: the same optimisation, within the GPU's own noise.

tests/test_plan.py shows on the CPU, in float32, that 8 x 1, 4 x 2 and 2 x 4 give the same losses and LoRA
weights. On the GPU a plan changes more than the split: checkpointed layers recompute, offloaded ones copy their
inputs, and bf16 kernels sum in other orders at other shapes. This trains the 8B shape STEPS optimizer steps of
EFFECTIVE samples from the same LoRA weights and seed under each plan below, through the trainer's own pieces
(bench/speed.py's setup: every speed patch on, as a stage trains), and writes every step's loss per plan, the
largest difference from the first plan, and the same for a second run of the first plan: the noise floor of this
GPU's kernels, against which the plans' differences are read. LoRA dropout is 0 here, as in the CPU test: its
masks are drawn per micro-batch, so a split draws other masks (another sample of the same noise, not a fault).

    python bench/same_optimisation.py --ckpt /tmp/q8b --out OUT [--steps 8] [--effective 32] [--px 448]
    python bench/same_optimisation.py --ckpt models/tiny-qwen3vl --out /tmp/so --px 64 --effective 8 --steps 2  # CPU

Writes OUT/same_optimisation.json and OUT/same_optimisation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_qlora_qwen3vl as tq  # noqa: E402
from curriculum import faults, speed  # noqa: E402
from curriculum.base_model import load_processor  # noqa: E402
from curriculum.data_files import load_records  # noqa: E402
from curriculum.plan import Plan, apply_plan  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_speed", Path(__file__).with_name("speed.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def plans(effective: int, layers: int) -> dict[str, Plan]:
    """The reference (one micro-batch, nothing recomputed), its repeat, and splits that recompute, offload and
    stream: what the plan chooses between at the budgets of bench/gpu_speed.sh."""
    return {"ref": Plan(effective, 1, 0, layers, False),
            "ref again": Plan(effective, 1, 0, layers, False),
            "half x 2, all checkpointed": Plan(effective // 2, 2, layers, layers, False),
            "quarter x 4, all offloaded": Plan(effective // 4, 4, layers, layers, True),
            "half x 2, a third streamed": Plan(effective // 2, 2, layers - layers // 3, layers, False, layers // 3)}


def varied_answers(train_file: Path) -> Path:
    """The bench's records with answers of 1 to 7 digits: micro-batches then hold different numbers of answer
    tokens, which is what the loss's weighting across an accumulated step must get right."""
    out = train_file.with_name("varied.jsonl")
    with open(train_file) as lines, open(out, "w") as f:
        for i, line in enumerate(lines):
            record = json.loads(line)
            f.write(json.dumps({**record, "answer": record["answer"][: 1 + i % 7]}) + "\n")
    return out


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="/tmp/q8b")
    p.add_argument("--out", required=True)
    p.add_argument("--px", type=int, default=448)
    p.add_argument("--effective", type=int, default=32, help="samples per optimizer step")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = args.effective * args.steps
    train_file = varied_answers(bench.make_dataset(Path(f"/tmp/same_data/W{args.px}"), args.px, records))
    cfg = bench.stage_config(args.ckpt, train_file, args.px, args.steps, {})
    cfg = dataclasses.replace(cfg, logging_steps=1, answer_only_logits=True, positions_in_dataloader=True,
                              drop_padding_mask=True, lora=dataclasses.replace(cfg.lora, dropout=0.0))
    processor = load_processor(args.ckpt, cfg)
    processor.image_processor.size = {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels}
    model = tq.new_adapter(tq.load_quantized_base(args.ckpt, cfg), cfg.lora, cfg.seed)
    gpu = torch.cuda.is_available()
    if gpu:
        print(json.dumps({"liger": bench.apply_liger(model, processor, train_file, args.px, cfg)}), flush=True)
    bench.set_variant_forwards(model, cfg, swiglu=gpu)
    patches = {key: speed.PatchDecision(True, "") for key in ("answer_only_logits", "positions_in_dataloader",
                                                              "drop_padding_mask")}
    dataset = tq.VQADataset(load_records(train_file), processor, cfg.min_pixels, cfg.max_pixels)
    initial = {n: w.detach().clone() for n, w in model.named_parameters() if w.requires_grad}
    runs = {}
    for name, plan in plans(args.effective, len(speed.language_layers(model))).items():
        why = speed.streaming_problem(model) if plan.streamed else None
        if why:
            print(json.dumps({name: f"skipped: {why}"}))
            continue
        with torch.no_grad():
            for n, w in model.named_parameters():
                if n in initial:
                    w.copy_(initial[n])
        apply_plan(model, plan)
        run_cfg = dataclasses.replace(cfg, batch_size=plan.micro_batch, grad_accum=plan.grad_accum)
        trainer = tq.build_trainer(model, processor, dataset, None, run_cfg,
                                   tq.StepSize(plan.micro_batch, plan.grad_accum), patches,
                                   Path("/tmp/same_out") / name.replace(" ", "_"), faults.StageGuard(model))
        trainer.train()
        weights = {n: w.detach().float().clone() for n, w in model.named_parameters() if n in initial}
        runs[name] = {"plan": dataclasses.asdict(plan), "losses": [h["loss"] for h in trainer.state.log_history
                                                                    if "loss" in h], "weights": weights}
        print(json.dumps({name: runs[name]["losses"]}), flush=True)
        del trainer
    ref = runs["ref"]
    moved = torch.sqrt(sum(((ref["weights"][n] - initial[n].float()) ** 2).sum() for n in initial))
    summary = {"gpu": torch.cuda.get_device_name(0) if gpu else "cpu", "px": args.px, "effective": args.effective,
               "steps": args.steps, "runs": {}}
    for name, run in runs.items():
        diff = torch.sqrt(sum(((run["weights"][n] - ref["weights"][n]) ** 2).sum() for n in initial))
        summary["runs"][name] = {
            "plan": run["plan"], "losses": run["losses"],
            "max_loss_diff": max(abs(a - b) for a, b in zip(run["losses"], ref["losses"], strict=True)),
            "weights_diff_of_update": round(float(diff / moved), 5)}  # |w - w_ref| / |w_ref - w_initial|
    (out / "same_optimisation.json").write_text(json.dumps(summary, indent=1))
    lines = [f"{summary['gpu']}, {args.px}x{args.px}, {args.effective} samples a step, {args.steps} steps, "
             "LoRA dropout 0", "",
             "| plan | " + " | ".join(f"step {i + 1}" for i in range(args.steps)) +
             " | largest loss difference from ref | LoRA update difference from ref |",
             "|---|" + "---|" * (args.steps + 2)]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} ({Plan(**r['plan']).short()}) | " + " | ".join(f"{x:.4f}" for x in r["losses"]) +
                     f" | {r['max_loss_diff']:.4f} | {r['weights_diff_of_update']:.2%} |")
    (out / "same_optimisation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
