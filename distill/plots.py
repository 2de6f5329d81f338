"""The report's figures, as PNG files: training loss per teacher, and scores with their intervals.

    loss_plot(run / "train_log.jsonl", run / "plots" / "train_loss.png")
    scores_plot({"student": {"boolq": (0.61, 0.51, 0.70)}}, run / "plots" / "scores.png")

Figures are built with matplotlib's object API on the Agg canvas, never through pyplot: no global
backend switch, no display needed (CI, ssh), and nothing left open between calls.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def read_train_log(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise DistillError(f"{path}:{n}: not a JSON line") from None
    return rows


def loss_plot(train_log: Path, out: Path) -> Path | None:
    """Total loss and each teacher's divergence (`div/<teacher>`) against the optimizer step.

    None when the log has no rows (a run that stopped before its first log step)."""
    rows = [r for r in read_train_log(train_log) if "step" in r]
    if not rows:
        return None
    teachers = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("div/")})
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r.get("loss") for r in rows], color="black", linewidth=2, label="loss (total)")
    for name in teachers:
        ax.plot(steps, [r.get(f"div/{name}") for r in rows], linewidth=1.3, label=f"divergence to {name}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title("Training loss per teacher")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def scores_plot(scores: dict[str, dict[str, tuple[float, float, float]]], out: Path) -> Path | None:
    """Grouped bars: one group per task, one bar per model, whiskers from low to high.

    scores: {model: {task: (accuracy, low, high)}}. None when there is nothing to draw."""
    tasks = list(dict.fromkeys(t for row in scores.values() for t in row))
    models = list(scores)
    if not tasks or not models:
        return None
    fig = _figure(max(6.4, 1.2 + 0.35 * len(tasks) * len(models)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for m, model in enumerate(models):
        xs, ys, err = [], [], [[], []]
        for t, task in enumerate(tasks):
            if task in scores[model]:
                acc, low, high = scores[model][task]
                xs.append(t - 0.4 + (m + 0.5) * width)
                ys.append(acc)
                err[0].append(max(acc - low, 0.0))
                err[1].append(max(high - acc, 0.0))
        ax.bar(xs, ys, width * 0.92, yerr=err, capsize=3, label=model, error_kw={"linewidth": 1})
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% interval)")
    ax.set_title("Scores per model and task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(len(models), 6), loc="upper left", bbox_to_anchor=(0, -0.12))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
