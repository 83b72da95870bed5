"""Writers of the entropy report's files (docs/numerics.md §6): figures, tables, shaded text, summary, index.

Figures are PNGs drawn by matplotlib's Agg backend (no display needed); tables are written twice,
Markdown for people and CSV for tools; token text in HTML is escaped, each token one
``<span class="tok">`` whose background deepens with its entropy; numbers go to ``summary.json``.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from megatron_archer.algorithms.metrics import LOW_ENTROPY

_STYLE = """body { font-family: sans-serif; max-width: 60em; margin: 2em auto; }
.response { font-family: monospace; white-space: pre-wrap; border: 1px solid #ccc;
            padding: 0.5em; margin: 1em 0; }
.prompt { color: #888; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.5em; }"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(entropy: np.ndarray, summary: Mapping[str, float], path: Path,
                   bins: int = 50) -> Path:
    """Histogram of token entropy with a log count axis, the 0.01 level and the forking
    threshold (p80) marked."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(entropy, bins=bins, log=True, color="#4c72b0")
    axes.axvline(LOW_ENTROPY, color="#55a868", linestyle=":",
                 label=f"H = {LOW_ENTROPY} ({100 * summary.get('share_below_0.01', 0):.1f}% below)")
    if "p80" in summary:
        axes.axvline(summary["p80"], color="#c44e52", linestyle="--",
                     label=f"80th percentile = {summary['p80']:.3f}")
    axes.set_xlabel("token entropy (nats)")
    axes.set_ylabel("tokens (log scale)")
    axes.set_title(f"Token entropy of {summary.get('count', len(entropy))} response tokens")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_binned_change(change: np.ndarray, path: Path, labels: tuple[str, str]) -> Path:
    """Bar chart of the mean entropy change (``labels[1]`` minus ``labels[0]``) per entropy
    percentile bin of ``labels[0]``."""
    plt = _pyplot()
    width = 100 / len(change)
    figure, axes = plt.subplots(figsize=(7, 4))
    centers = (np.arange(len(change)) + 0.5) * width
    axes.bar(centers, np.nan_to_num(change), width=0.9 * width, color="#8172b2")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xlabel(f"entropy percentile of {labels[0]} (%)")
    axes.set_ylabel("mean entropy change (nats)")
    axes.set_title(f"{labels[1]} minus {labels[0]}, per {width:g}% bin")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_table(rows: Sequence[Mapping], stem: Path) -> tuple[Path, Path]:
    """``rows`` (dicts with the same keys) as ``<stem>.csv`` (full precision) and ``<stem>.md``."""
    columns = list(rows[0]) if rows else []
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with csv_path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    escape = lambda text: text.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(escape(_cell(row[c])) for c in columns) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _token_span(text: str, entropy: float, scale: float) -> str:
    alpha = min(1.0, entropy / scale) if scale > 0 else 0.0
    return (f'<span class="tok" style="background: rgba(230, 85, 13, {alpha:.3f})" '
            f'title="H = {entropy:.4f}">{html.escape(text)}</span>')


def write_shaded_html(samples: Sequence[tuple[str, Sequence[str], np.ndarray]], scale: float,
                      path: Path) -> Path:
    """Each sample ``(prompt_text, response token texts, their entropies)`` as the grey prompt
    then the response, one shaded span per token (full colour at entropy >= ``scale``; hover
    shows the value): the forks stand out."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Token entropy</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Responses shaded by token entropy</h1><p>Full colour at H &ge; {scale:.3f} nats "
             f"(the 99th percentile); hover a token for its entropy.</p>"]
    for number, (prompt, tokens, entropy) in enumerate(samples):
        spans = "".join(_token_span(t, float(h), scale) for t, h in zip(tokens, entropy))
        parts.append(f'<h2>Response {number}</h2><div class="response">'
                     f'<span class="prompt">{html.escape(prompt)}</span>{spans}</div>')
    parts.append("</body></html>\n")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def write_json(data, path: Path) -> Path:
    """``data`` as indented JSON (NaN written as null)."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")
    return path


def write_index(directory: Path, headline: Mapping[str, str], files: Mapping[str, str]) -> None:
    """``README.md`` and ``index.html``: the headline numbers and what each file shows."""
    lines = ["# Token entropy report", "", "| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in headline.items()]
    lines += ["", "## Files", ""]
    lines += [f"- [`{name}`]({name}): {what}" for name, what in files.items()]
    (directory / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                   for k, v in headline.items())
    items = []
    for name, what in files.items():
        link = f'<a href="{html.escape(name)}">{html.escape(name)}</a>: {html.escape(what)}'
        image = f'<br><img src="{html.escape(name)}" alt="{html.escape(what)}">' \
            if name.endswith(".png") else ""
        items.append(f"<li>{link}{image}</li>")
    (directory / "index.html").write_text(
        f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Token entropy report</title>"
        f"<style>{_STYLE}</style></head><body><h1>Token entropy report</h1>"
        f"<table>{rows}</table><h2>Files</h2><ul>{''.join(items)}</ul></body></html>\n",
        encoding="utf-8")
