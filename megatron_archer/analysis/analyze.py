"""``analyze_entropy``: responses -> per-token entropy -> the report directory (docs/numerics.md §6).

Responses are generated from a prompt set by the local engine or read from a saved
``responses.jsonl``; their tokens are scored by the checkpoint (and, for a comparison, by a
second checkpoint on the same tokens) with the actor's vocab-parallel op; ``stats`` turns the
entropies into the papers' measurements and ``report`` writes them. Layout of the directory:

- ``README.md``, ``index.html``: headline numbers (share below 0.01, p80) and the file list;
- ``summary.json``: every number below;
- ``responses.jsonl``: the responses measured (``--responses`` input for another checkpoint);
- ``token_entropy.jsonl``: per response, its token ids and entropies under the checkpoint;
- ``entropy_histogram.png``: the distribution, log count axis, 0.01 and p80 marked;
- ``token_table.md`` / ``.csv``: highest and lowest mean-entropy tokens seen >= min_count times;
- ``sample.html``: the first responses, tokens shaded by entropy;
- with a second checkpoint: ``compare_token_entropy.jsonl``, ``entropy_change.png`` and
  ``entropy_change.md`` / ``.csv`` (mean change per 5% percentile bin), the top-20% overlap;
- with sweep settings: ``sweep.md`` / ``.csv`` (accuracy and length per decoding setting).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from megatron_archer.analysis import report, stats
from megatron_archer.analysis.collect import collect_entropy, load_runner, model_parallel_groups
from megatron_archer.analysis.config import AnalysisConfig
from megatron_archer.analysis.responses import (
    Response,
    generate_responses,
    read_responses,
    write_responses,
)
from megatron_archer.analysis.sweep import parse_setting, run_sweep
from megatron_archer.data import DataConfig, load_prompt_set
from megatron_archer.models import require_hf_model_dir, require_tokenizer_dir
from megatron_archer.rewards import load_reward_fn
from megatron_archer.rollout import LocalEngine, SamplingParams


def _prompts(config: AnalysisConfig, tokenizer):
    prompt_set = load_prompt_set(DataConfig(path=config.prompts, template=config.template,
                                            shuffle=False), tokenizer)
    return list(prompt_set.prompts[: config.num_prompts])


def _stop_ids(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)


def _write_token_entropy(path: Path, responses: list[Response],
                         entropies: list[np.ndarray]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for response, entropy in zip(responses, entropies):
            out.write(json.dumps({"prompt_index": response.prompt_index,
                                  "sample_index": response.sample_index,
                                  "token_ids": list(response.response_ids),
                                  "entropy": entropy.tolist()}) + "\n")


def _measure(config: AnalysisConfig, responses: list[Response]) -> tuple[list, list | None, bool]:
    """Entropies under the checkpoint (and the comparison checkpoint); whether this rank writes."""
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    with model_parallel_groups(config.tensor_parallel, config.pipeline_parallel):
        writer = dist.get_rank() == 0
        budget = max(config.max_tokens_per_micro_batch,
                     max(len(r.prompt_ids) + len(r.response_ids) for r in responses))
        entropies = collect_entropy(load_runner(config.checkpoint, budget, dtype), responses)
        compared = None
        if config.compare_checkpoint:
            compared = collect_entropy(load_runner(config.compare_checkpoint, budget, dtype),
                                       responses)
    return entropies, compared, writer


def analyze_entropy(config: AnalysisConfig) -> dict:
    """Measure, then write the report directory (on rank 0); returns the summary."""
    require_hf_model_dir(config.checkpoint, "--checkpoint")
    if config.compare_checkpoint:
        require_hf_model_dir(config.compare_checkpoint, "--compare-checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(require_tokenizer_dir(
        config.tokenizer or config.checkpoint, "--tokenizer" if config.tokenizer else "--checkpoint"))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = _prompts(config, tokenizer) if config.prompts else None
    needs_engine = prompts is not None and (not config.responses or config.sweep)
    engine = LocalEngine(config.checkpoint) if needs_engine else None
    if config.responses:
        responses = read_responses(config.responses)
    else:
        responses = generate_responses(engine, prompts, SamplingParams(
            max_new_tokens=config.max_new_tokens, n=config.samples_per_prompt,
            temperature=config.temperature, stop_token_ids=_stop_ids(tokenizer), seed=config.seed))
    entropies, compared, writer = _measure(config, responses)

    flat = np.concatenate(entropies)
    token_ids = np.concatenate([np.asarray(r.response_ids, dtype=np.int64) for r in responses])
    distribution = stats.distribution_summary(flat)
    summary = {"checkpoint": config.checkpoint, "responses": len(responses),
               "distribution": distribution}
    files = {"summary.json": "every number of this report",
             "responses.jsonl": "the responses measured (reuse with --responses)",
             "token_entropy.jsonl": "per response: token ids and their entropies"}
    if writer:
        write_responses(out / "responses.jsonl", responses)
        _write_token_entropy(out / "token_entropy.jsonl", responses, entropies)
        report.plot_histogram(flat, distribution, out / "entropy_histogram.png")
        files["entropy_histogram.png"] = "token entropy distribution (log count axis)"

    highest, lowest = stats.token_entropy_table(token_ids, flat, config.min_count,
                                                config.top_tokens)
    table = [{"kind": kind, "rank": rank, "token_id": s.token_id,
              "token": json.dumps(tokenizer.decode([s.token_id]), ensure_ascii=False),
              "count": s.count, "mean_entropy": s.mean_entropy}
             for kind, group in (("highest", highest), ("lowest", lowest))
             for rank, s in enumerate(group, 1)]
    summary["token_table"] = {"min_count": config.min_count, "rows": len(table)}
    if writer:
        report.write_table(table, out / "token_table")
        files["token_table.md"] = (f"highest / lowest mean-entropy tokens seen >= "
                                   f"{config.min_count} times (also .csv)")
        scale = distribution.get("p99") or float(flat.max(initial=0.0)) or 1.0
        shown = [(tokenizer.decode(list(r.prompt_ids)),
                  [tokenizer.decode([t]) for t in r.response_ids], e)
                 for r, e in list(zip(responses, entropies))[: config.rendered_samples]]
        report.write_shaded_html(shown, scale, out / "sample.html")
        files["sample.html"] = "responses with tokens shaded by entropy"

    if compared is not None:
        other = np.concatenate(compared)
        change = stats.binned_change(flat, other, config.num_bins)
        width = 100 / config.num_bins
        counts = np.bincount(stats.percentile_bins(flat, config.num_bins),
                             minlength=config.num_bins)
        bins = [{"bin": b, "percentiles": f"{b * width:g}-{(b + 1) * width:g}",
                 "tokens": int(counts[b]), "mean_change": float(change[b])}
                for b in range(config.num_bins)]
        summary["comparison"] = {
            "checkpoint": config.compare_checkpoint, "rho": config.rho,
            "top_overlap": stats.top_overlap(flat, other, config.rho),
            "mean_change": float(np.mean(other.astype(np.float64) - flat)) if len(flat) else 0.0,
            "distribution": stats.distribution_summary(other),
            "bins": bins,
        }
        if writer:
            _write_token_entropy(out / "compare_token_entropy.jsonl", responses, compared)
            report.write_table(bins, out / "entropy_change")
            report.plot_binned_change(change, out / "entropy_change.png",
                                      ("checkpoint", "compared"))
            files["compare_token_entropy.jsonl"] = "the same tokens' entropies, compared checkpoint"
            files["entropy_change.png"] = "mean entropy change per percentile bin (also .md/.csv)"

    if config.sweep:
        settings = [parse_setting(s, distribution.get("p80")) for s in config.sweep]
        rows = run_sweep(engine, prompts, settings, load_reward_fn(config.reward),
                         lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
                         samples_per_problem=config.sweep_samples,
                         max_new_tokens=config.max_new_tokens,
                         stop_token_ids=_stop_ids(tokenizer), seed=config.seed)
        summary["sweep"] = rows
        if writer:
            report.write_table(rows, out / "sweep")
            files["sweep.md"] = "accuracy and length under entropy-aware decoding (also .csv)"

    if writer:
        report.write_json(summary, out / "summary.json")
        report.write_index(out, _headline(summary), files)
    return summary


def _headline(summary: dict) -> dict[str, str]:
    d = summary["distribution"]
    headline = {"responses": str(summary["responses"]), "response tokens": str(d["count"])}
    if d["count"]:
        headline.update({
            "share of tokens with H < 0.01": f"{100 * d['share_below_0.01']:.1f}%",
            "80th percentile (forking threshold)": f"{d['p80']:.3f} nats",
            "mean entropy": f"{d['mean']:.3f} nats"})
    if "comparison" in summary:
        c = summary["comparison"]
        headline[f"top-{100 * c['rho']:g}% position overlap"] = f"{100 * c['top_overlap']:.1f}%"
        headline["mean entropy change"] = f"{c['mean_change']:+.4f} nats"
    return headline
