"""The ``megatron-archer`` console script.

- ``train CONFIG [key=value ...]``: an RL run (under ``torchrun`` for several processes);
- ``eval CONFIG [key=value ...] --k 8``: avg@k, pass@k and mean response length on the data set;
- ``convert {hf-to-megatron,megatron-to-hf} ...``: ``megatron_archer.models.convert``;
- ``ablate CONFIG [key=value ...]``: variants x seeds with a report (``megatron_archer.ablation``);
- ``plan CONFIG [key=value ...]``: every rank of the job built on this CPU, its memory per rank
  (``megatron_archer.dryrun``).

Another package may add subcommands: when ``megatron_archer.analysis.cli`` (or
``megatron_archer.ablation.cli``) exists, its ``register(subparsers)`` is called; each subcommand
sets ``func(args) -> int`` as its default.
"""

import argparse
import importlib.util
import sys

from megatron_archer import __version__


def _train(args) -> int:
    import torch.distributed as dist

    from megatron_archer.distributed import init_process_group
    from megatron_archer.trainer import load_config, run_training

    config = load_config(args.config, args.overrides)
    init_process_group(config.parallel.timeout_minutes)
    try:
        run_training(config)
    finally:
        dist.destroy_process_group()
    return 0


def _eval(args) -> int:
    import json

    from megatron_archer.trainer import load_config
    from megatron_archer.trainer.evaluate import evaluate

    config = load_config(args.config, args.overrides)
    result = evaluate(config, k=args.k, limit=args.limit, model_path=args.model)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(result, out, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-archer",
        description="Entropy-aware RLVR (Archer, forking tokens) on Megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-archer {__version__}")
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="an RL run (under torchrun for several processes)")
    train.add_argument("config", help="experiment YAML")
    train.add_argument("overrides", nargs="*", default=[],
                       help="section.field=value (value parsed as YAML), before or after options")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "eval", help="avg@k, pass@k and mean response length on the config's data set")
    evaluate.add_argument("config", help="experiment YAML (model, data, rollout, reward)")
    evaluate.add_argument("overrides", nargs="*", default=[],
                          help="section.field=value, before or after options")
    evaluate.add_argument("--k", type=int, default=8, help="samples per problem (default 8)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N problems only")
    evaluate.add_argument("--model", help="HF checkpoint to evaluate (default: model.path)")
    evaluate.add_argument("--out", help="also write the results to this JSON file")
    evaluate.set_defaults(func=_eval)

    # listed here for the help; main hands everything after "convert" to the converter's parser
    commands.add_parser(
        "convert", add_help=False,
        help="HF <-> megatron checkpoints (megatron_archer.models.convert; --help for its options)")

    for package in ("megatron_archer.analysis", "megatron_archer.ablation", "megatron_archer.dryrun"):
        if (importlib.util.find_spec(package) is not None
                and importlib.util.find_spec(f"{package}.cli") is not None):
            importlib.import_module(f"{package}.cli").register(commands)
    return parser


# megatron-core's notices that Transformer Engine or Apex is absent: expected on a CPU machine,
# where the CPU path never uses them; on a GPU machine Python's default shows each once
_EXPECTED_ON_CPU = (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                    r".*CUDA_DEVICE_MAX_CONNECTIONS", r"full scope is deprecated")


def _quiet_expected_warnings() -> None:
    import warnings

    import torch

    if not torch.cuda.is_available():
        for message in _EXPECTED_ON_CPU:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # its own parser, --help included
        from megatron_archer.models import convert

        _quiet_expected_warnings()
        convert.main(argv[1:], prog="megatron-archer convert")
        return 0
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (``eval cfg.yaml --k 2 data.path=X``)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    _quiet_expected_warnings()  # here, not earlier: it imports torch, which --help need not
    try:
        return args.func(args)
    except (OSError, ValueError) as error:  # FileNotFoundError, a full disk, a config mistake
        print(f"megatron-archer {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
