"""The report writers on hand-made inputs: token text escaped in HTML, one span per token,
tables with escaped cells and full-precision CSV, PNGs that decode (NaN bins included)."""

from __future__ import annotations

import csv

import numpy as np
from PIL import Image  # matplotlib's dependency: reports need both

from megatron_archer.analysis import report
from tests.analysis.common import parse_html


def test_shaded_html_escapes_every_token(tmp_path):
    tokens = ["<b>", "&amp;", "\n", "a|b", ""]
    entropy = np.array([0.0, 0.5, 1.0, 2.0, 0.25], dtype=np.float32)
    path = report.write_shaded_html([("<prompt & co>", tokens, entropy)], 1.0,
                                    tmp_path / "s.html")
    text = path.read_text()
    assert parse_html(path).spans == len(tokens)
    assert "&lt;b&gt;" in text and "&amp;amp;" in text and "&lt;prompt &amp; co&gt;" in text
    assert "rgba(230, 85, 13, 0.000)" in text and text.count("rgba(230, 85, 13, 1.000)") == 2


def test_table_markdown_and_csv(tmp_path):
    rows = [{"token": "a|b\nc", "mean": 1 / 3, "bin": float("nan")}, {"token": "x", "mean": 2.0,
                                                                      "bin": 1.0}]
    csv_path, md_path = report.write_table(rows, tmp_path / "t")
    lines = md_path.read_text().splitlines()
    assert len(lines) == 4 and lines[2] == "| a\\|b\\nc | 0.3333 | nan |"
    with csv_path.open() as table:
        read = list(csv.DictReader(table))
    assert read[0]["token"] == "a|b\nc" and float(read[0]["mean"]) == 1 / 3


def test_figures_decode(tmp_path):
    x = np.random.default_rng(0).exponential(1.0, 200).astype(np.float32)
    paths = [report.plot_histogram(x, {"count": 200, "share_below_0.01": 0.01, "p80": 1.6},
                                   tmp_path / "h.png"),
             report.plot_binned_change(np.array([0.1, np.nan, -0.2]), tmp_path / "c.png",
                                       ("base", "rl"))]
    for path in paths:
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) > 100
