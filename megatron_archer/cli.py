"""The `megatron-archer` console script (subcommands arrive with the trainer)."""

import argparse

from megatron_archer import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-archer",
        description="Entropy-aware RLVR (Archer, forking tokens) on Megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"megatron-archer {__version__}")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
