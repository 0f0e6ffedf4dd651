"""Stage 3 of the demo curriculum with and without replay: every dev split's loss and accuracy at the end.

    python bench/replay.py                        # stages 1 and 2, then stage 3 three times; prints the table
    python bench/replay.py --fraction 0.3         # another replay share
    python bench/replay.py --report               # only the table, from the runs already under --root
    python bench/replay.py --set max_steps=10     # a quick look: settings passed to every stage

Each stage runs as a user runs it (`python train_qlora_qwen3vl.py configs/demo/stageN.yaml --set ...`), under
--root (default models/replay_bench; a finished stage there is kept and reused). Stage 3 runs from the same stage 2
three times: as shipped (`stage3_plain`), with `replay.fraction` (`stage3_replay`: the mixed set is larger, so its
2 epochs take more steps), and with replay for as many steps as without (`stage3_replay_same_steps`). All watch the
dev splits of stages 1 and 2 (watch_earlier_stages, on by default), so the numbers come from their
stage_metrics.json. The table is also written to ROOT/replay_table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_stage(config: str, out: Path, prev: Path | None, extra: list[str]) -> None:
    if (out / "stage_metrics.json").is_file():
        print(f"=== {out} is finished: reused", flush=True)
        return
    cmd = [sys.executable, "train_qlora_qwen3vl.py", config, "--set", f"output_dir={out}"]
    cmd += ["--set", f"prev_checkpoint={prev}"] if prev else []
    cmd += extra
    print("=== " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def accuracy(dev_metrics: dict | None) -> str:
    overall = (dev_metrics or {}).get("overall")
    return f"{overall['accuracy']:.1%} ({overall['correct']}/{overall['n']})" if overall else "–"


def at_end(m: dict) -> list[tuple[str, float, float, str]]:
    """(dev split, loss before stage 3, loss after it, accuracy after it) of one stage-3 run: the earlier stages'
    splits as it watched them, then its own."""
    out = [(f"stage {e['stage']} dev", e["loss_at_start"], e["final_loss"], accuracy(e["dev_metrics"]))
           for e in m["earlier_stages"]]
    return out + [(f"stage {m['stage']} dev (its own)", m["first_eval_loss_own_split"], m["final_eval_loss"],
                   accuracy(m["dev_metrics"]))]


def table(runs: dict[str, dict]) -> str:
    """One row per dev split; per run, the loss and accuracy after stage 3."""
    columns = {name: at_end(m) for name, m in runs.items()}
    first = next(iter(columns.values()))
    for name, rows in columns.items():  # every run started from the same stage 2, on the same splits
        assert [(r[0], r[1]) for r in rows] == [(r[0], r[1]) for r in first], f"{name} started elsewhere"
    lines = ["| dev split | loss before stage 3 | " + " | ".join(f"{name}: loss | accuracy" for name in runs) + " |",
             "|---|---|" + "---|---|" * len(runs)]
    for i, (split, start, _, _) in enumerate(first):
        lines.append(f"| {split} | {start:.4f} | " + " | ".join(f"{rows[i][2]:.4f} | {rows[i][3]}"
                                                                for rows in columns.values()) + " |")
    lines.append("")
    for name, m in runs.items():
        r = m.get("replay")
        mixed = (f", {r['replayed_records']} of them replayed ("
                 + ", ".join(f"{e['records']} from stage {e['stage']}" for e in r["sources"]) + f"; seed {r['seed']})"
                 if r else "")
        lines.append(f"- {name}: {m['global_steps']} steps on {m['train_samples']} records{mixed}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="models/replay_bench")
    parser.add_argument("--fraction", type=float, default=0.2, help="replay.fraction of the replay run (0.2)")
    parser.add_argument("--report", action="store_true", help="print the table from the runs already there")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every stage")
    args = parser.parse_args()
    root = (REPO / args.root).resolve()
    extra = [item for kv in args.set for item in ("--set", kv)]
    replay = ["--set", f"replay.fraction={args.fraction}"]
    if not args.report:
        run_stage("configs/demo/stage1.yaml", root / "stage1", None, extra)
        run_stage("configs/demo/stage2.yaml", root / "stage2", root / "stage1", extra)
        run_stage("configs/demo/stage3.yaml", root / "stage3_plain", root / "stage2", extra)
        run_stage("configs/demo/stage3.yaml", root / "stage3_replay", root / "stage2", extra + replay)
    plain = json.loads((root / "stage3_plain" / "stage_metrics.json").read_text())
    same_steps = ["--set", f"max_steps={plain['global_steps']}"]  # as many steps as without replay
    if not args.report:
        run_stage("configs/demo/stage3.yaml", root / "stage3_replay_same_steps", root / "stage2",
                  extra + replay + same_steps)
    runs = {name: json.loads((root / folder / "stage_metrics.json").read_text()) for name, folder in (
        ("no replay", "stage3_plain"), (f"replay {args.fraction:g}", "stage3_replay"),
        (f"replay {args.fraction:g}, {plain['global_steps']} steps", "stage3_replay_same_steps"))}
    text = table(runs)
    (root / "replay_table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
