"""The speed table: bench/speed.py's variants as ratios to the yardstick measured in the same device call.

    python bench/report.py OUT    # reads OUT/yardstick.json and OUT/speed.json, prints Markdown
"""

import json
import sys
from pathlib import Path


def table(out: Path) -> str:
    yard = {r["image_px"]: r for r in json.loads((out / "yardstick.json").read_text())}
    speed = json.loads((out / "speed.json").read_text())
    rows = ["| workload / variant | batch | ckpt layers | samples/s | tokens/s | peak GiB | × yardstick | "
            "first step s | input pipeline samples/s |", "|---|---|---|---|---|---|---|---|---|"]
    for px, y in sorted(yard.items()):
        rows.append(f"| W{px} yardstick (textbook HF loop) | {y['batch']} | all | {y['samples_per_s']} | "
                    f"{y['tokens_per_s']} | {y['peak_GiB']} | 1.00 | – | – |")
        for r in speed["results"]:
            if r.get("image_px") != px:
                continue
            if r.get("oom"):
                rows.append(f"| {r['variant']} | {r['batch']} | | out of memory | | | | | |")
                continue
            rows.append(f"| {r['variant']} | {r['batch']} | {r['checkpointed_layers']} | {r['samples_per_s']} | "
                        f"{r['tokens_per_s']} | {r['peak_GiB']} | {r['samples_per_s'] / y['samples_per_s']:.2f} | "
                        f"{r['first_step_s']} | {r['pipeline_samples_per_s']} |")
    for r in speed["results"]:
        if r["variant"] == "generation":
            rows.append(f"\nGeneration at 448x448: {r['questions']} questions batched {r['batch']} at a time in "
                        f"{r['batched_s']} s, {r['one_at_a_time_questions']} one at a time in {r['one_at_a_time_s']} "
                        f"s: {r['speedup']}x faster per question batched; identical answers "
                        f"{r['identical_answers']} (first token's argmax differs on "
                        f"{r['first_token_argmax_differs']}, where the top two logits were "
                        f"{r['top2_margin_where_it_differs']} apart; median gap {r['top2_margin_median']}).")
            for label, t in r.get("timing", {}).items():
                rows.append(f"- {label}: {t['seconds']} s = prefill {t['prefill_s']} s + {t['decode_steps']} decode "
                            f"steps (median {t['decode_step_median_s']} s) + {t['outside_generate_s']} s outside "
                            "generate (inputs not yet prepared, decoding the answers)")
        if r["variant"] == "generation-fp32":
            rows.append(f"\nThe same with float32 compute, {r['questions']} questions: identical answers "
                        f"{r['identical_answers']}, first-token logits within {r['first_token_max_abs_logit_diff']}.")
    return f"GPU: {speed['gpu']}\n\n" + "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
