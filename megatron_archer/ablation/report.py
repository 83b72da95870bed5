"""The ablation's report from the per-run summaries: mean +- standard deviation over seeds per
variant (``table.md`` / ``table.csv``, and ``README.md`` with "mean +- std" cells), accuracy and
entropy curves per variant shaded by the seed spread (``curves.png``), the final metrics with
error bars (``final.png``), the per-claim paired differences, intervals and verdicts of held-out
avg@k (``claims.md`` / ``claims.csv``, and a section of ``README.md``: ``claims.claim_verdicts``)
and everything machine-readable in ``summary.json``.

The standard deviation is the sample one (n - 1 in the denominator) over the seeds that finished;
with one seed it is null. Curves: at each step, the mean over the seeds that logged a finite
value, shaded from mean - std to mean + std.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from megatron_archer.ablation.claims import claim_verdicts
from megatron_archer.ablation.config import WARM_START, Claim
from megatron_archer.analysis.report import _pyplot, write_json, write_table

CURVE_PANELS = (("accuracy", "rollout accuracy (training prompts)"),
                ("entropy", "mean token entropy (nats)"))


def metric_names(k: int) -> tuple[str, ...]:
    return (f"avg@{k}", f"pass@{k}", "mean_response_length", "top_overlap")


def run_metrics(summary: Mapping, k: int) -> dict[str, float | None]:
    """A run's final numbers: evaluation, and the entropy overlap (None for the warm start)."""
    evaluation = summary["eval"]
    overlap = summary.get("entropy", {}).get("top_overlap")
    return {f"avg@{k}": evaluation[f"avg@{k}"], f"pass@{k}": evaluation[f"pass@{k}"],
            "mean_response_length": evaluation["mean_response_length"], "top_overlap": overlap}


def mean_std(values: Sequence[float]) -> dict:
    """n, mean and sample standard deviation (None below 2 values) of the non-None values."""
    kept = np.asarray([v for v in values if v is not None], dtype=np.float64)
    n = len(kept)
    return {"n": n, "mean": float(kept.mean()) if n else None,
            "std": float(kept.std(ddof=1)) if n >= 2 else None}


def aggregate(summaries: Mapping[str, Mapping[int, Mapping]], k: int) -> dict:
    """Per variant and metric: mean, std, n and the per-seed values."""
    result = {}
    for variant, by_seed in summaries.items():
        per_seed = {seed: run_metrics(s, k) for seed, s in by_seed.items()}
        result[variant] = {
            name: {**mean_std([m[name] for m in per_seed.values()]),
                   "values": {str(seed): m[name] for seed, m in per_seed.items()}}
            for name in metric_names(k)}
    return result


def curve_bands(by_seed: Mapping[int, Mapping]) -> dict[str, list]:
    """Per step: mean and std over seeds of each curve (None where no seed has a value)."""
    steps = sorted({s for summary in by_seed.values() for s in summary["curves"]["step"]})
    bands: dict[str, list] = {"step": steps}
    for name, _ in CURVE_PANELS:
        at = {step: [] for step in steps}
        for summary in by_seed.values():
            curves = summary["curves"]
            for step, value in zip(curves["step"], curves[name]):
                if value is not None and math.isfinite(value):
                    at[step].append(value)
        stats = [mean_std(at[step]) for step in steps]
        bands[f"{name}_mean"] = [s["mean"] for s in stats]
        bands[f"{name}_std"] = [s["std"] for s in stats]
    return bands


def _format(stat: Mapping, percent: bool) -> str:
    if stat["mean"] is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * stat['mean']:.1f}"
    return text + (f" ± {scale * stat['std']:.1f}" if stat["std"] is not None else "")


def plot_curves(bands: Mapping[str, Mapping[str, list]], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(13, 4.2))
    colours = plt.get_cmap("tab20")
    for i, (variant, band) in enumerate(bands.items()):
        for ax, (name, _) in zip(axes, CURVE_PANELS):
            points = [(s, m, d or 0.0) for s, m, d in
                      zip(band["step"], band[f"{name}_mean"], band[f"{name}_std"]) if m is not None]
            if not points:
                continue
            steps, means, stds = map(np.asarray, zip(*points))
            colour = colours((2 * i) % 20 + (2 * i // 20) % 2)  # dark hues first, then light
            ax.plot(steps, means, color=colour, label=variant, linewidth=1.2, marker=".")
            ax.fill_between(steps, means - stds, means + stds, color=colour, alpha=0.15)
    for ax, (_, title) in zip(axes, CURVE_PANELS):
        ax.set_title(title + ", mean ± std over seeds")
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_final(table: Mapping[str, Mapping], k: int, path: Path) -> Path:
    plt = _pyplot()
    names = [f"avg@{k}", f"pass@{k}", "top_overlap"]
    figure, axes = plt.subplots(1, len(names), figsize=(14, 0.35 * len(table) + 1.8), sharey=True)
    variants = list(table)
    for ax, name in zip(axes, names):
        for y, variant in enumerate(variants):
            stat = table[variant][name]
            if stat["mean"] is not None:
                ax.errorbar(stat["mean"], y, xerr=stat["std"] or 0.0, fmt="o", capsize=3,
                            color="black" if variant == WARM_START else "#4c72b0")
        ax.set_title(f"{name}, mean ± std over seeds", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(variants)), variants, fontsize=8)
    axes[0].invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def markdown_table(table: Mapping[str, Mapping], k: int, rho: float) -> str:
    """The table with "mean ± std" cells, accuracies and the overlap in percent."""
    names = metric_names(k)
    headers = ["variant", "seeds", f"avg@{k} (%)", f"pass@{k} (%)", "mean length (tokens)",
               f"top-{100 * rho:g}% entropy positions shared with the warm start (%)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for variant, row in table.items():
        cells = [variant, str(row[names[0]]["n"]), _format(row[names[0]], True),
                 _format(row[names[1]], True), _format(row[names[2]], False),
                 _format(row[names[3]], True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _points(value: float | None, signed: bool = True) -> str:
    return "-" if value is None else f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def claims_markdown(rows: Sequence[Mapping], k: int) -> str:
    """The claims' table: differences of held-out avg@k in percentage points."""
    headers = ["claim (variant > or < reference)", "source", "seeds",
               "per-seed difference (points)", "mean (points)", "95% interval (points)",
               "SD of the differences", "detectable at 80% power (points)", "verdict"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        interval = "-" if row["low"] is None else \
            f"{_points(row['low'])} to {_points(row['high'])}"
        per_seed = ", ".join(f"{seed}: {_points(d)}" for seed, d in row["differences"].items())
        lines.append("| " + " | ".join([
            row["claim"], row["source"] or "-", str(row["n"]), per_seed or "-",
            _points(row["mean"]), interval, _points(row["sd"], signed=False),
            _points(row["mde"], signed=False), row["verdict"]]) + " |")
    return "\n".join(lines)


def write_claims(rows: Sequence[Mapping], stem: Path) -> None:
    """``claim_verdicts`` rows as ``<stem>.csv`` and ``<stem>.md`` (full precision, raw
    differences per seed)."""
    write_table([{**{key: row[key] for key in ("claim", "source", "verdict", "n", "mean", "low",
                                               "high", "sd", "mde")},
                  "differences": " ".join(f"{s}:{d!r}" for s, d in row["differences"].items())}
                 for row in rows], stem)


def write_report(out: Path, summaries: Mapping[str, Mapping[int, Mapping]], k: int, rho: float,
                 seeds: Sequence[int], missing: Sequence[str],
                 claims: Sequence[Claim] = ()) -> dict:
    """Every report file under ``out``; returns what ``summary.json`` holds. ``summaries``:
    variant -> seed -> run summary, in table order (the warm start first); ``claims``: the
    comparisons to give a verdict on (none: no claims section)."""
    out.mkdir(parents=True, exist_ok=True)
    table = aggregate(summaries, k)
    names = metric_names(k)
    write_table([{"variant": v, "seeds": row[names[0]]["n"],
                  **{f"{n}_{part}": row[n][part] for n in names for part in ("mean", "std")}}
                 for v, row in table.items()], out / "table")
    verdicts = claim_verdicts(claims, {v: row[names[0]]["values"] for v, row in table.items()})
    files = ["README.md", "table.md", "table.csv", "curves.png", "final.png"]
    if verdicts:
        write_claims(verdicts, out / "claims")
        files += ["claims.md", "claims.csv"]
    bands = {v: curve_bands(by_seed) for v, by_seed in summaries.items() if v != WARM_START}
    plot_curves(bands, out / "curves.png")
    plot_final(table, k, out / "final.png")
    text = ["# Ablation report", "",
            f"avg@{k} and pass@{k} at T = 1 on held-out problems, mean ± sample std over the "
            f"seeds that finished (seeds {list(seeds)}).", "", markdown_table(table, k, rho), "",
            "![curves](curves.png)", "", "![final](final.png)", ""]
    if verdicts:
        text += ["## Claims", "",
                 f"Held-out avg@{k}, variant minus reference, paired by seed (same warm-start "
                 f"evaluation, same prompts), in percentage points: mean, 95% t-interval, and "
                 f"the smallest difference this design detects with 80% power (two-sided alpha "
                 f"0.05, from the SD of the differences). Reproduced: the interval excludes 0 on "
                 f"the paper's side; contradicted: on the other side; identical: the two variants "
                 f"scored exactly the same on every seed; else inconclusive.", "",
                 claims_markdown(verdicts, k), ""]
    if missing:
        text += ["Not finished yet: " + ", ".join(missing), ""]
    (out / "README.md").write_text("\n".join(text), encoding="utf-8")
    times = [s["time"]["total"] for by_seed in summaries.values() for s in by_seed.values()]
    summary = {"k": k, "rho": rho, "seeds": list(seeds), "metrics": list(names), "table": table,
               "curves": bands, "claims": verdicts, "missing": list(missing),
               "time": {"runs": len(times), "wall_s": sum(t["wall_s"] for t in times),
                        "cpu_s": sum(t["cpu_s"] for t in times)},
               "files": files}
    write_json(summary, out / "summary.json")
    return summary
