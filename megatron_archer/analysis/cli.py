"""The ``analyze-entropy`` subcommand: ``register(subparsers)`` adds it to the main CLI.

Every option maps one-to-one to an ``AnalysisConfig`` field; the handler writes the report
directory and prints its headline numbers.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from megatron_archer.analysis.config import AnalysisConfig

_HELP = {
    "checkpoint": "Hugging Face model directory to measure",
    "output_dir": "report directory to write",
    "prompts": "prompt set (.jsonl/.parquet) to generate responses from (and to sweep on)",
    "responses": "saved responses.jsonl to measure instead of generating",
    "compare_checkpoint": "second model scored on the same responses (overlap, change per bin)",
    "tokenizer": "tokenizer directory (default: the checkpoint's)",
    "template": "prompt template: paper or chat",
    "num_prompts": "use the first N prompts",
    "samples_per_prompt": "responses generated per prompt",
    "max_new_tokens": "response length limit (generation and sweep)",
    "temperature": "sampling temperature of the generated responses",
    "seed": "sampling seed",
    "min_count": "token table: only tokens seen at least this often",
    "top_tokens": "token table: rows per end (highest / lowest)",
    "rho": "top fraction of positions for the overlap",
    "num_bins": "percentile bins for the entropy change (20 = 5%% bins)",
    "rendered_samples": "responses rendered in sample.html",
    "sweep": "entropy-aware decoding settings threshold:t_high:t_low (threshold may be p80)",
    "sweep_samples": "samples per problem for each sweep setting",
    "reward": "reward function for the sweep (built-in name or module:function)",
    "max_tokens_per_micro_batch": "token budget of one packed micro-batch when scoring",
    "tensor_parallel": "tensor-parallel size when scoring",
    "pipeline_parallel": "pipeline-parallel size when scoring",
    "bf16": "score with bfloat16 weights",
}


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze-entropy`` to an ``add_subparsers()`` object; ``args.func(args)`` runs it."""
    parser = subparsers.add_parser(
        "analyze-entropy", help="token entropy report of a checkpoint (docs/numerics.md §6)",
        description="Generate (or read) responses, score their token entropy and write a report "
                    "directory: distribution, token table, shaded sample, checkpoint comparison "
                    "and an entropy-aware decoding sweep.")
    for f in fields(AnalysisConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name in ("checkpoint", "output_dir"):
            parser.add_argument(flag, required=True, help=_HELP[f.name])
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_HELP[f.name])
        elif f.name == "sweep":
            parser.add_argument(flag, nargs="*", default=(), help=_HELP[f.name])
        else:
            kind = int if f.name == "num_prompts" else str if default is None else type(default)
            parser.add_argument(flag, type=kind, default=default, help=_HELP[f.name])
    parser.set_defaults(func=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    """Run the analysis from parsed arguments; print the headline numbers; exit status 0."""
    from megatron_archer.analysis.analyze import analyze_entropy

    values = {f.name: getattr(args, f.name) for f in fields(AnalysisConfig)}
    config = AnalysisConfig(**{**values, "sweep": tuple(values["sweep"])})
    summary = analyze_entropy(config)
    d = summary["distribution"]
    line = f"{config.output_dir}: {d['count']} tokens"
    if d["count"]:
        line += f", {100 * d['share_below_0.01']:.1f}% below 0.01, p80 = {d['p80']:.3f}"
    if "comparison" in summary:
        overlap = summary["comparison"]["top_overlap"]
        line += f", top-{100 * config.rho:g}% overlap {100 * overlap:.1f}%"
    print(line)
    return 0
