"""Plots and markdown for fine-tuning comparisons (used by ``bench/finetune_report.py``).

* :func:`plot_loss_curves` — training loss against step, one line per run (a moving average);
* :func:`plot_routing` — the paper's Figure 5 in heat-map form: mean routing probability per expert
  (columns) per task (rows), training tasks above the line, held-out tasks below;
* :func:`markdown_table` — a markdown table (the comparison: trainable share, final loss, accuracies).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

__all__ = ["moving_average", "plot_loss_curves", "plot_routing", "markdown_table"]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (same length as ``values``)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(
    runs: dict[str, Sequence[tuple[int, float]]], path: str | pathlib.Path, *, window: int = 20, title: str = ""
) -> None:
    """PNG of each run's training loss (moving average over ``window`` steps) against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in runs.items():
        if not points:
            continue
        steps = [s for s, _ in points]
        ax.plot(steps, moving_average([v for _, v in points], window), label=name, linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {window} steps)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_routing(
    stats: dict[str, Sequence[float]],
    held_out: set[str],
    path: str | pathlib.Path,
    *,
    title: str,
) -> None:
    """Heat map of mean routing probability per expert (columns) per task (rows, training tasks first)."""
    import numpy as np

    plt = _pyplot()
    train_tasks = sorted(t for t in stats if t not in held_out)
    held = sorted(t for t in stats if t in held_out)
    rows = train_tasks + held
    data = np.array([stats[t] for t in rows])
    fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.6 * data.shape[1]), 1.5 + 0.22 * len(rows)))
    im = ax.imshow(data, aspect="auto", cmap="viridis")  # colour range = the data's (differences are small)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=5, color="white")
    ax.set_yticks(range(len(rows)), [t + (" *" if t in held_out else "") for t in rows], fontsize=7)
    ax.set_xticks(range(data.shape[1]), [str(e) for e in range(data.shape[1])], fontsize=7)
    ax.set_xlabel("expert")
    if train_tasks and held:
        ax.axhline(len(train_tasks) - 0.5, color="white", linewidth=2)
    ax.set_title(title + "\n(* held-out task)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="mean routing probability")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (cells formatted with str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
