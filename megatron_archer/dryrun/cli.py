"""The ``plan`` subcommand: ``register(subparsers)`` adds it to the main CLI."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``plan CONFIG [key=value ...]``; ``args.func(args)`` runs it."""
    parser = subparsers.add_parser(
        "plan", help="build every rank of a training job on this CPU and report its memory",
        description="Build every rank of the job CONFIG describes, at its full world size, on "
                    "the meta device with a fake process group (no GPU, no memory): the model "
                    "stage, reference model, DDP buffers and optimizer shard through the job's "
                    "own code, so a layout the job would refuse is refused here with its "
                    "message. Prints a per-rank table (bytes built; activations estimated) and "
                    "writes it as JSON. Exit status 1 when a rank exceeds --gpu-memory.")
    parser.add_argument("config", help="experiment YAML (e.g. examples/scale/*.yaml)")
    parser.add_argument("overrides", nargs="*", default=[],
                        help="section.field=value (value parsed as YAML), before or after options")
    parser.add_argument("--model-config", metavar="PATH",
                        help="Hugging Face model directory or its config.json (default: "
                             "model.path); examples/scale/model_configs/ has the published "
                             "configs of the example models")
    parser.add_argument("--world-size", type=int,
                        help="number of training GPUs (default: from --nodes, else the world "
                             "size parallel.data implies)")
    parser.add_argument("--nodes", type=int,
                        help="training nodes: world size = nodes x --gpus-per-node (default: "
                             "none)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs of a training node (default 8)")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="memory of one GPU, e.g. 80GiB: ranks above it are marked and the "
                             "exit status is 1 (default: none, nothing marked)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as markdown, ranks with equal figures on one row "
                             "(default: one terminal row a rank)")
    parser.add_argument("--out", metavar="FILE",
                        help="JSON report (default: plan-<config name>.json here)")
    parser.set_defaults(func=handle)
    return parser


def handle(args: argparse.Namespace) -> int:
    from megatron_archer.dryrun import plan
    from megatron_archer.models import require_hf_model_dir
    from megatron_archer.trainer import load_config

    config = load_config(args.config, args.overrides)
    gpu_memory = plan.parse_bytes(args.gpu_memory) if args.gpu_memory else None
    world_size = plan.world_size_of(config, args.world_size, args.nodes, args.gpus_per_node)
    if args.model_config:
        spec = plan.model_spec(args.model_config)
    else:
        try:
            path = require_hf_model_dir(config.model.path, "model.path")
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error}; pass --model-config with the model's config.json "
                                    f"(examples/scale/model_configs/ has the example models')") \
                from None
        spec = plan.model_spec(path, "model.path")
    report = plan.plan(config, spec, world_size, gpu_memory)
    out = Path(args.out or f"plan-{Path(args.config).stem}.json")
    plan.write_json(report, out)
    print(plan.format_markdown(report) if args.markdown else plan.format_table(report))
    print(f"JSON: {out}")
    return 1 if any(rank["fits"] is False for rank in report["ranks"]) else 0
