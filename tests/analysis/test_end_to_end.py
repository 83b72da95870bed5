"""``analyze_entropy`` on a tiny Qwen3 checkpoint with the tiny tokenizer: generated arithmetic
responses, a comparison with itself and a decoding sweep. The report's files are well formed and
its numbers equal direct recomputations; the CLI handler, through ``register()``, measures the
saved responses again."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image  # matplotlib's dependency: reports need both

from megatron_archer.actor import SequenceBatch
from megatron_archer.analysis import AnalysisConfig, analyze_entropy, read_responses
from megatron_archer.analysis.cli import register
from megatron_archer.data import build_tiny_tokenizer, write_arithmetic_jsonl
from tests.actor.common import hf_logprobs
from tests.analysis.common import parse_html
from tests.models.checkpoints import write_checkpoint

SWEEP = ("0.5:1.2:0.6", "p80:1.0:1.0")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The report of one analysis: 3 prompts x 2 responses of <= 24 tokens, compared with itself."""
    root = tmp_path_factory.mktemp("analysis")
    tokenizer = build_tiny_tokenizer()
    checkpoint = write_checkpoint(root / "model", "qwen3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(checkpoint)
    config = AnalysisConfig(
        checkpoint=str(checkpoint), output_dir=str(root / "report"),
        prompts=str(write_arithmetic_jsonl(root / "prompts.jsonl", 3)), samples_per_prompt=2,
        max_new_tokens=24, compare_checkpoint=str(checkpoint), min_count=3, top_tokens=5,
        rendered_samples=2, sweep=SWEEP, sweep_samples=2, reward="arithmetic",
        max_tokens_per_micro_batch=256)
    return config, analyze_entropy(config), root / "report"


def _token_entropy(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_are_well_formed(run):
    config, summary, out = run
    for name in ("entropy_histogram.png", "entropy_change.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100
    responses = read_responses(out / "responses.jsonl")
    assert len(responses) == 6 and all(0 < len(r.response_ids) <= 24 for r in responses)
    shown = sum(len(r.response_ids) for r in responses[: config.rendered_samples])
    assert parse_html(out / "sample.html").spans == shown
    parse_html(out / "index.html")
    readme = (out / "README.md").read_text()
    assert "80th percentile" in readme and "entropy_histogram.png" in readme
    with (out / "token_table.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == summary["token_table"]["rows"] > 0
    assert len((out / "token_table.md").read_text().splitlines()) == len(rows) + 2
    with (out / "sweep.csv").open() as table:
        sweep = list(csv.DictReader(table))
    assert len(sweep) == len(SWEEP) and all(0 <= float(r["accuracy"]) <= 1 for r in sweep)
    assert float(sweep[1]["threshold"]) == summary["distribution"]["p80"]  # "p80" resolved


def test_summary_equals_recomputation(run):
    config, summary, out = run
    saved = json.loads((out / "summary.json").read_text())
    records = _token_entropy(out / "token_entropy.jsonl")
    flat = np.array([h for r in records for h in r["entropy"]], dtype=np.float32)
    ordered = np.sort(flat)
    d = saved["distribution"]
    assert d["count"] == len(flat) == sum(len(r["token_ids"]) for r in records)
    assert d["mean"] == pytest.approx(float(flat.astype(np.float64).mean()), rel=1e-12)
    assert d["share_below_0.01"] == float(np.mean(flat < np.float32(0.01)))
    for p in (0.5, 0.8, 0.9, 0.95, 0.99):
        assert d[f"p{100 * p:g}"] == float(ordered[math.ceil(p * len(flat)) - 1])
    ids = [t for r in records for t in r["token_ids"]]
    with (out / "token_table.csv").open() as table:
        for row in csv.DictReader(table):
            values = flat[np.array(ids) == int(row["token_id"])]
            assert int(row["count"]) == len(values) >= config.min_count
            assert float(row["mean_entropy"]) == pytest.approx(values.astype(np.float64).mean())


def test_entropy_equals_transformers(run):
    config, _, out = run
    responses = read_responses(out / "responses.jsonl")
    batch = SequenceBatch(
        input_ids=[torch.tensor(r.prompt_ids + r.response_ids) for r in responses],
        response_mask=[torch.arange(len(r.prompt_ids) + len(r.response_ids)) >= len(r.prompt_ids)
                       for r in responses])
    expected = hf_logprobs(config.checkpoint, batch)
    for record, (_, entropy, _) in zip(_token_entropy(out / "token_entropy.jsonl"), expected):
        assert np.allclose(record["entropy"], entropy.numpy(), atol=1e-4)


def test_self_comparison(run):
    _, summary, out = run
    comparison = summary["comparison"]
    assert comparison["top_overlap"] == 1.0 and comparison["mean_change"] == 0.0
    assert all(b["mean_change"] == 0.0 for b in comparison["bins"])  # >= 20 tokens: no empty bin
    assert sum(b["tokens"] for b in comparison["bins"]) == summary["distribution"]["count"]
    assert (_token_entropy(out / "compare_token_entropy.jsonl")
            == _token_entropy(out / "token_entropy.jsonl"))


def test_cli_measures_saved_responses(run, tmp_path, capsys):
    config, _, out = run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args([
        "analyze-entropy", "--checkpoint", config.checkpoint, "--output-dir", str(tmp_path),
        "--responses", str(out / "responses.jsonl"), "--min-count", "3",
        "--max-tokens-per-micro-batch", str(config.max_tokens_per_micro_batch)])
    assert args.func(args) == 0
    assert "p80 =" in capsys.readouterr().out
    assert (_token_entropy(tmp_path / "token_entropy.jsonl")  # same packing: same numbers
            == _token_entropy(out / "token_entropy.jsonl"))
    assert not (tmp_path / "sweep.csv").exists() and not (tmp_path / "entropy_change.png").exists()
