"""The speed table of one device call: the yardstick, Unsloth and the project's variants, side by side.

    python bench/report.py OUT    # reads OUT/yardstick.json, OUT/unsloth.json (if there), OUT/speed.json

Ratios: "× yardstick" against the textbook loop at the same image size; "× Unsloth ≤ mem" against the fastest Unsloth
row of the same image size whose peak memory is at most this row's (the rate Unsloth reaches within the same memory;
"–" when no Unsloth row fits); "× Unsloth best" against its fastest row of that image size at any memory. "batch" is
samples per forward x accumulation steps (a plan's micro-batch and accumulation). "GPU idle" is the share of a
profiled step's wall time with no kernel running, "syncs" the host synchronisations (cudaStreamSynchronize) per
step, both from torch.profiler over two steps, for the variants profiled. Below the table: each plan, what it
measured to choose, and its rate when it chose.
"model TFLOP/s" counts 4 x N per token (forward and input gradients over the N parameters of the decoder layers;
LoRA gives the frozen base no weight gradients, and recomputation is not counted), and "of peak" divides it by the
H200's measured bf16 matmul peak.
"""

import json
import sys
from pathlib import Path

BF16_PEAK_TFLOPS = 790  # measured bf16 matmul rate of one H200 (the issue on speed)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["results"] if isinstance(data, dict) else data


def best_unsloth_within(unsloth: list[dict], px: int, peak: float) -> dict | None:
    fits = [u for u in unsloth if u.get("image_px") == px and u.get("samples_per_s") and u["peak_GiB"] <= peak]
    return max(fits, key=lambda u: u["samples_per_s"], default=None)


def table(out: Path) -> str:
    yard = {r["image_px"]: r for r in read_rows(out / "yardstick.json") if r.get("samples_per_s")}
    # Unsloth's plain loop with the same LoRA dropout as the others (its sweep also has dropout-0 and SFTTrainer rows)
    unsloth = [r for r in read_rows(out / "unsloth.json")
               if r.get("impl", "unsloth") == "unsloth" and r.get("lora_dropout", 0.05) > 0 and r.get("image_px")]
    speed = json.loads((out / "speed.json").read_text())
    ours = [r for r in speed["results"] if r.get("image_px") and "variant" in r]
    n_params = next((r["language_params"] for r in ours if r.get("language_params")), None)

    def flops(r: dict) -> str:
        if not n_params or not r.get("tokens_per_s"):
            return "– | –"
        tflops = 4 * n_params * r["tokens_per_s"] / 1e12
        return f"{tflops:.0f} | {tflops / BF16_PEAK_TFLOPS:.0%}"

    rows = ["| image | who | batch | samples/s | peak GiB | × yardstick | × Unsloth ≤ mem | × Unsloth best | "
            "model TFLOP/s | of peak | GPU idle | syncs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plans = []
    for px in sorted({r["image_px"] for r in ours} | set(yard)):
        y = yard.get(px)
        def ratio(r: dict, y: dict | None = y) -> str:
            return f"{r['samples_per_s'] / y['samples_per_s']:.2f}" if y else "–"

        fastest = max((u for u in unsloth if u.get("image_px") == px and u.get("samples_per_s")),
                      key=lambda u: u["samples_per_s"], default=None)
        if y:
            rows.append(f"| W{px} | yardstick (textbook HF loop) | {y['batch']} | {y['samples_per_s']} | "
                        f"{y['peak_GiB']} | 1.00 | – | – | {flops(y)} | – | – |")
        for u in sorted((u for u in unsloth if u.get("image_px") == px), key=lambda u: u["batch"]):
            if u.get("error") or not u.get("samples_per_s"):
                rows.append(f"| W{px} | Unsloth | {u['batch']} | {u.get('error') or 'no result'} | | | | | | | | |")
                continue
            rows.append(f"| W{px} | Unsloth | {u['batch']} | {u['samples_per_s']} | {u['peak_GiB']} | {ratio(u)} | "
                        f"– | – | {flops(u)} | – | – |")
        for r in (r for r in ours if r["image_px"] == px):
            if r.get("skipped") or r.get("oom") or r.get("error"):
                why = "skipped (deadline)" if r.get("skipped") else "out of memory" if r.get("oom") else r["error"]
                rows.append(f"| W{px} | {r['variant']} | {r.get('batch', '')} | {why} | | | | | | | | |")
                continue
            u = best_unsloth_within(unsloth, px, r["peak_GiB"])
            vs_unsloth = f"{r['samples_per_s'] / u['samples_per_s']:.2f} (bs {u['batch']})" if u else "–"
            vs_best = f"{r['samples_per_s'] / fastest['samples_per_s']:.2f}" if fastest else "–"
            idle = f"{r['gpu_idle_share']:.0%}" if "gpu_idle_share" in r else "–"
            syncs = f"{r['syncs_per_step']:.0f}" if "syncs_per_step" in r else "–"
            batch = f"{r['batch']}x{r.get('grad_accum', 1)}" if r.get("plan") else r["batch"]
            rows.append(f"| W{px} | {r['variant']} | {batch} | {r['samples_per_s']} | {r['peak_GiB']} | "
                        f"{ratio(r)} | {vs_unsloth} | {vs_best} | {flops(r)} | {idle} | {syncs} |")
            if (r.get("plan") or {}).get("chosen"):
                plans.append(plan_line(r))
    return f"GPU: {speed['gpu']}\n\n" + "\n".join(rows) + ("\n\nPlans:\n" + "\n".join(plans) if plans else "")


def plan_line(r: dict) -> str:
    """- W448-plan64-budget12: 64 x 1, 36/36 checkpointed, offloaded (41.2 samples/s when planned, 9.8 GiB of 10.8
    usable; 18 s); timed: 64x1 36/36 offloaded 41.2 at 9.8 GiB, ...; over the budget: ..."""
    plan = r["plan"]
    c = plan["chosen"]

    def describe(t: dict) -> str:
        streamed = f" {t['streamed']} streamed" if t.get("streamed") else ""
        return (f"{t['micro_batch']}x{t['grad_accum']} {t['checkpointed']}/{t['layers']}"
                f"{' offloaded' if t['offload'] and t['checkpointed'] else ''}{streamed}")

    timed = "; ".join(f"{describe(t)}: {t['samples_per_s']} at {t['peak_gib']} GiB" for t in plan.get("timed", []))
    over = "; ".join(f"{describe(t)} ({t['peak_gib']} GiB)" for t in plan.get("over_budget", []))
    return (f"- {r['variant']}: {describe(c)} ({plan.get('samples_per_s')} samples/s when planned, "
            f"{plan.get('peak_gib')} GiB of {plan.get('usable_gib')} usable; planning took {r.get('plan_s')} s). "
            f"Timed: {timed}." + (f" Over the budget when measured: {over}." if over else ""))


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
