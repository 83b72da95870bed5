"""Reward, accuracy and entropy curves of a run, from its metrics.jsonl, as one PNG (Agg).

A step's values are means over its few dozen responses, so each series is drawn faintly per
step and, once a run has 20 steps or more, with its trailing mean over a tenth of the run."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = (
    ("reward", (("reward/mean", "mean reward"),)),
    ("accuracy", (("reward/accuracy", "rollout accuracy"),)),
    ("entropy", (("entropy/mean", "mean token entropy"), ("entropy/p80", "80th percentile"))),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The metrics.jsonl records, one dict per step (a skipped step lacks the training keys)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Each value's mean with the up to ``window - 1`` values before it."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(i + 1, window)
            for i in range(len(values))]


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path, *,
                before: float | None = None, after: float | None = None) -> Path:
    """Three panels (reward, accuracy, entropy) against the RL step; ``before``/``after``, when
    given, are the evaluation set's avg@k marked on the accuracy panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_jsonl)
    window = len(records) // 10
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, series) in zip(axes, PANELS):
        for key, label in series:
            points = [(r["step"], r[key]) for r in records  # non-finite values are strings
                      if isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            if window < 2:
                ax.plot(steps, values, marker=".", label=label)
                continue
            line, = ax.plot(steps, values, marker=".", markersize=2, linewidth=0.5, alpha=0.3)
            ax.plot(steps, trailing_mean(list(values), window), color=line.get_color(),
                    label=f"{label} (mean of {window} steps)")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    if before is not None and after is not None and records:
        last = max(r["step"] for r in records)
        axes[1].scatter([0, last], [before, after], color="black", zorder=3,
                        label="held-out eval avg@k (before, after)")
    for ax in axes:
        if ax.lines or ax.collections:
            ax.legend(fontsize=8)
    figure.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png
