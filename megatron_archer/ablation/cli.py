"""The ``ablate`` subcommand: ``register(subparsers)`` adds it to the main CLI."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``ablate CONFIG [key=value ...] [--report-only]``; ``args.func(args)`` runs it."""
    parser = subparsers.add_parser(
        "ablate", help="algorithm variants x seeds from one warm start, with a report",
        description="Warm-start a tiny model on the step-by-step arithmetic task, run every "
                    "variant x seed for the same steps and rollout budget, evaluate each final "
                    "checkpoint on held-out problems and write a report (mean +- std over seeds, "
                    "curves, entropy overlap). Finished runs are reused.")
    parser.add_argument("config", help="ablation YAML (e.g. examples/ablations/papers.yaml)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="field=value overrides of the ablation config (out=..., seeds=[0])")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report of the finished runs; run nothing")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names: run (and report) only these, e.g. "
                             "one lane of an ablation run in two processes on the same out")
    parser.set_defaults(func=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    from megatron_archer.ablation.ablate import ablate
    from megatron_archer.ablation.config import load_ablation_config, select_variants

    config = load_ablation_config(args.config, args.overrides)
    if args.variants is not None:
        config = select_variants(config, [n for n in args.variants.split(",") if n])
    ablate(config, report_only=args.report_only)
    return 0
