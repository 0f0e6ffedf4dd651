"""The plots of a curriculum, written as PNG files (never shown): the loss across all stages and the accuracy by
question type, into each stage folder; the forgetting matrix, for vqa_eval.py --forgetting.

matplotlib is imported when a plot is drawn: it takes seconds, and only the end of a stage needs it.
"""

from __future__ import annotations

from pathlib import Path

from curriculum.lineage import recorded_chain
from curriculum.records import QUESTION_TYPES


def dev_split_series(chain_metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{"stage K dev": [(step, loss), ...]}: every loss measured on each dev split, across all stages, on one step
    axis (stage after stage): in stage K its own evaluations, in later stages their watch of it (and the
    continuity measure before their first step). Splits are told apart by file; named after the first stage that
    ended on it."""
    name_of: dict[str, str] = {}
    for m in chain_metrics:
        if m.get("final_eval_file"):
            name_of.setdefault(m["final_eval_file"], f"stage {m.get('stage')} dev")
    series: dict[str, dict[int, float]] = {}
    offset = 0

    def add(file: str | None, step: int, loss: float | None) -> None:
        if file and loss is not None:
            series.setdefault(name_of.get(file, Path(file).name), {})[offset + step] = loss

    for m in chain_metrics:
        own, steps = m.get("final_eval_file"), m.get("global_steps", 0)
        add(m.get("first_eval_file"), 0, m.get("first_eval_loss"))
        add(own, 0, m.get("first_eval_loss_own_split"))
        for h in m.get("eval_loss_history", []):
            add(own, h["step"], h["loss"])
        add(own, steps, m.get("final_eval_loss"))
        for e in m.get("earlier_stages") or []:
            add(e.get("eval_file"), 0, e.get("loss_at_start"))
            for h in e.get("loss_history", []):
                add(e.get("eval_file"), h["step"], h["loss"])
            add(e.get("eval_file"), steps, e.get("final_loss"))
        offset += steps
    return {name: sorted(points.items()) for name, points in series.items()}


def _pyplot():
    """matplotlib's pyplot on the file-only backend: plots are written to PNG, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(chain: list[dict], path: Path) -> None:
    """Train loss of each stage, and one line per dev split across all stages (in its own stage, its evaluations;
    in later stages, their watch of it: forgetting shows as a line that climbs), on one step axis with the stage
    boundaries marked: a restart shows as a jump. A dev split's line has its stage's colour. `chain`: the stages'
    stage_metrics.json, oldest first."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset = 0
    colour = {}
    for i, m in enumerate(chain):
        colour[f"stage {m['stage']} dev"] = plt.cm.tab10(i)
        train = m.get("train_loss_history", [])
        ax.plot([offset + h["step"] for h in train], [h["loss"] for h in train], color=plt.cm.tab10(i), alpha=0.5,
                label=f"stage {m['stage']} train")
        if i:  # the label's height is in axes coordinates, so later stages cannot move it off the top
            ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"stage {m['stage']} starts", (offset, 1), xycoords=ax.get_xaxis_transform(),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="grey")
        offset += m.get("global_steps", 0)
    for name, points in dev_split_series(chain).items():
        ax.plot([s for s, _ in points], [v for _, v in points], "o--", color=colour.get(name, "black"),
                markersize=5, label=name)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.set_title("Loss across the curriculum: each dev split's line must carry on across the dotted boundaries")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_by_type(chain: list[dict], path: Path) -> None:
    """Grouped bars: dev-split accuracy per question type (free text: exact match), one group per stage, with 95%
    intervals."""
    plt = _pyplot()
    kinds = [*QUESTION_TYPES, "overall"]
    stages = [(m["stage"], m.get("dev_metrics")) for m in chain if m.get("dev_metrics")]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / max(len(stages), 1)
    for i, (stage, metrics) in enumerate(stages):
        xs, ys, errs = [], [], [[], []]
        for k, kind in enumerate(kinds):
            m = metrics.get(kind)
            if not m or m["accuracy"] is None:
                continue
            xs.append(k + (i - (len(stages) - 1) / 2) * width)
            ys.append(m["accuracy"])
            errs[0].append(m["accuracy"] - m["accuracy_ci95"][0])
            errs[1].append(m["accuracy_ci95"][1] - m["accuracy"])
        ax.bar(xs, ys, width=width * 0.95, yerr=errs, capsize=3, label=f"after stage {stage}")
    ax.set_xticks(range(len(kinds)), [k.replace("_", " ") + ("\n(exact match)" if k == "free_text" else "")
                                      for k in kinds])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy on the stage's dev split")
    ax.set_title("Accuracy by question type (bars: 95% Wilson intervals)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_forgetting(matrix: dict, path: Path) -> None:
    plt = _pyplot()
    rows, cols = matrix["trained"], matrix["evaluated"]
    values = [[matrix["accuracy"][r][c] for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", color="white" if v < 0.6 else "black")
    ax.set_xticks(range(len(cols)), [f"stage {c} dev" for c in cols])
    ax.set_yticks(range(len(rows)), [("base" if r == "base" else f"after stage {r}") for r in rows])
    ax.set_title("Forgetting matrix: accuracy")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_stage_plots(stage_dir: Path) -> list[Path]:
    chain = [s.metrics for s in recorded_chain(stage_dir)]  # this stage and every stage before it
    paths = [stage_dir / "loss_curve.png"]
    plot_loss_curve(chain, paths[0])
    if any(m.get("dev_metrics") for m in chain):
        paths.append(stage_dir / "accuracy_by_type.png")
        plot_accuracy_by_type(chain, paths[1])
    return paths

