"""Checkpoint conversion: Hugging Face directory <-> megatron-archer model checkpoint.

``hf_to_megatron`` and ``megatron_to_hf`` run on every rank of a job (torchrun) or in a single
process, which then makes its own one-rank gloo group. Everything that can be checked from the
files (missing directory, not a checkpoint, unsupported architecture, a layout that does not
divide the model, an output in the way) is checked before any process group or model exists,
identically on every rank. ``main`` is the command line (tools/convert_checkpoint.py).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.distributed import init_process_group
from megatron_archer.models.dist_checkpoint import (
    load_model_checkpoint,
    read_model_checkpoint,
    save_model_checkpoint,
)
from megatron_archer.models.hf_export import hf_weight_buckets
from megatron_archer.models.hf_import import CheckpointError, SafetensorsCheckpoint, load_hf_model
from megatron_archer.models.hf_save import parse_size, write_hf_checkpoint
from megatron_archer.models.output_dir import atomic_output_dir, check_output_dir
from megatron_archer.models.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tensor_parallel: int | None = None,
    pipeline_parallel: int = 1,
    force: bool = False,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
) -> None:
    """Load the HF checkpoint at the given layout and save it as a distributed checkpoint.

    ``tensor_parallel`` defaults to world size / ``pipeline_parallel``; ``expert_parallel`` and
    ``expert_tensor_parallel`` (default: ``tensor_parallel``) split a mixture-of-experts
    model's experts.
    """
    hf_dir = _existing_dir(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} is not a Hugging Face checkpoint: no config.json")
    spec = ModelSpec.from_pretrained(hf_dir)
    try:
        SafetensorsCheckpoint(hf_dir)
    except FileNotFoundError as error:
        raise CheckpointError(f"{hf_dir} is not a Hugging Face checkpoint: {error}") from None
    check_output_dir(out_dir, force)
    with _model_parallel(spec, tensor_parallel, pipeline_parallel, expert_parallel,
                         expert_tensor_parallel):
        loaded = load_hf_model(hf_dir)
        with atomic_output_dir(out_dir, force=force, collective=True) as tmp:
            save_model_checkpoint(loaded.model, loaded.spec, tmp, hf_source=hf_dir)


def megatron_to_hf(
    megatron_dir: str | Path,
    out_dir: str | Path,
    *,
    tensor_parallel: int | None = None,
    pipeline_parallel: int = 1,
    max_shard_size: str | int = "5GB",
    dtype: torch.dtype | None = None,
    force: bool = False,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
) -> None:
    """Load the distributed checkpoint at the given layout and write an HF directory (rank 0).

    ``dtype`` defaults to the checkpoint's parameter dtype.
    """
    checkpoint = read_model_checkpoint(_existing_dir(megatron_dir))
    max_shard_bytes = parse_size(max_shard_size)
    check_output_dir(out_dir, force)
    with _model_parallel(checkpoint.spec, tensor_parallel, pipeline_parallel, expert_parallel,
                         expert_tensor_parallel):
        loaded = load_model_checkpoint(checkpoint.directory)
        buckets = hf_weight_buckets(loaded.model, loaded.spec, loaded.backend)
        if dist.get_rank() == 0:
            write_hf_checkpoint(
                buckets,
                out_dir,
                metadata_dir=checkpoint.hf_dir,
                dtype=dtype,
                max_shard_bytes=max_shard_bytes,
                force=force,
            )
        else:
            for _ in buckets:  # every rank takes part in the gathers
                pass
        dist.barrier()


def _existing_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    return path


@contextmanager
def _model_parallel(spec: ModelSpec, tensor_parallel: int | None, pipeline_parallel: int,
                    expert_parallel: int = 1, expert_tensor_parallel: int | None = None):
    """Megatron's groups for the layout, after checking it against the model and world size;
    the process group too when none exists (torchrun's environment, else a one-rank group)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    tp = tensor_parallel or max(world // pipeline_parallel, 1)
    etp = expert_tensor_parallel or tp
    spec.validate_parallelism(tp, pipeline_parallel, expert_parallel, etp)
    if world % (tp * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not a multiple of tensor x pipeline parallel "
            f"{tp} x {pipeline_parallel}"
        )
    if world % (etp * expert_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not a multiple of expert-tensor x expert x pipeline "
            f"parallel {etp} x {expert_parallel} x {pipeline_parallel}")
    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron model parallel is already initialised; convert needs its own")
    created = not dist.is_initialized()
    if created:
        init_process_group()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pipeline_parallel,
        expert_model_parallel_size=expert_parallel, expert_tensor_parallel_size=etp,
    )
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Convert between a Hugging Face checkpoint directory and a megatron-archer "
        "distributed model checkpoint. Run as one process or under torchrun."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_mg = commands.add_parser("hf-to-megatron", help="HF directory -> distributed checkpoint")
    to_mg.add_argument("--hf", required=True, type=Path, help="Hugging Face checkpoint directory")
    to_hf = commands.add_parser("megatron-to-hf", help="distributed checkpoint -> HF directory")
    to_hf.add_argument("--megatron", required=True, type=Path, help="model checkpoint directory")
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB (default), 500MiB")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    for command in (to_mg, to_hf):
        command.add_argument("--out", required=True, type=Path, help="output directory")
        command.add_argument("--tp", type=int, help="tensor parallel (default: world size / pp)")
        command.add_argument("--pp", type=int, default=1, help="pipeline parallel (default: 1)")
        command.add_argument("--ep", type=int, default=1,
                             help="expert parallel, mixture-of-experts models (default: 1)")
        command.add_argument("--etp", type=int,
                             help="expert-tensor parallel (default: the tensor-parallel size)")
        command.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Parse ``argv`` and convert; a problem with the inputs exits with status 2 and its message.
    ``prog``: the command name in usage lines (``megatron-archer convert`` from the CLI)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    layout = dict(tensor_parallel=args.tp, pipeline_parallel=args.pp, force=args.force,
                  expert_parallel=args.ep, expert_tensor_parallel=args.etp)
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args.hf, args.out, **layout)
        else:
            megatron_to_hf(
                args.megatron,
                args.out,
                max_shard_size=args.max_shard_size,
                dtype=DTYPES.get(args.dtype),
                **layout,
            )
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
