"""The table of a GPU bench call: every stage under OUT (NAME_metrics.json beside NAME.log), against the yardstick
(OUT/**/yardstick.json) measured in the same call, and the scaling efficiency of two processes against one.

    python bench/gpu_summary.py OUT      # prints markdown, and writes it to OUT/summary.md
"""

import json
import re
import statistics
import sys
from pathlib import Path


def steady_samples_per_second(log: Path, effective_batch: int) -> float | None:
    """From the `step N/M | ... | dt X s/step` lines, leaving out the first interval (warm-up, dataloader start)."""
    if not log.is_file():
        return None
    dts = [float(x) for x in re.findall(r"dt ([0-9.]+)s/step", log.read_text())][1:]
    return effective_batch / statistics.median(dts) if dts else None


def main(out: Path) -> str:
    yardsticks = sorted(out.rglob("yardstick.json"))
    base = json.loads(yardsticks[0].read_text())[0]["samples_per_s"] if yardsticks else None
    lines = [f"yardstick (textbook HF QLoRA loop, batch 4, W448): {base} samples/s" if base else "no yardstick", "",
             "| run | processes | batch per process | steady samples/s | x yardstick | whole run samples/s | "
             "peak GiB per GPU | first_eval -> final_eval (previous final) |", "|---|---|---|---|---|---|---|---|"]
    steady = {}
    for path in sorted(out.rglob("*_metrics.json")):
        m = json.loads(path.read_text())
        name = str(path.relative_to(out)).removesuffix("_metrics.json")
        sps = steady_samples_per_second(path.with_name(path.name.replace("_metrics.json", ".log")),
                                        m["effective_batch_size"])
        steady[name] = sps
        ratio = f"{sps / base:.2f}" if sps and base else "-"
        lines.append(f"| {name} | {m['num_processes']} | {m['effective_batch_size'] // m['num_processes']} | "
                     f"{sps:.2f} | {ratio} | {m['samples_per_second']} | {m['peak_gpu_memory_gib']} | "
                     f"{m['first_eval_loss']:.4f} -> {m['final_eval_loss']:.4f} ({m['previous_final_eval_loss']}) |"
                     if sps else f"| {name} | {m['num_processes']} | - | - | - | {m['samples_per_second']} | "
                                 f"{m['peak_gpu_memory_gib']} | - |")
    one, two = steady.get("smoke/stage1"), steady.get("ddp/stage1")
    if one and two:
        lines += ["", f"Scaling efficiency, DDP stage 1 on 2 GPUs against stage 1 on one: {two:.2f} / (2 x {one:.2f}) "
                      f"= {two / (2 * one):.3f}"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
