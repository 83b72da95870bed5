"""Write a Hugging Face checkpoint directory from ``(hf_name, full_tensor)`` buckets.

The layout is what ``save_pretrained`` writes: ``model.safetensors``, or for more than one shard
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (``weight_map`` and
``metadata.total_size``), next to ``config.json`` and the source's other non-weight files
(tokenizer, ``generation_config.json``, chat template, license, ...). Shards are filled in
arrival order up to ``max_shard_bytes`` (a larger tensor gets a shard of its own); one shard is
held in memory at a time, as safetensors writes a file in one call. The directory appears only
when complete (``output_dir.atomic_output_dir``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_archer.buckets import bounded_buckets
from megatron_archer.models.output_dir import atomic_output_dir

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: an int, or "5GB" (10^9, as transformers reads it), "500MiB", "40KB"."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise ValueError(f"size {size!r}: expected a number of bytes or e.g. '5GB', '500MiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def non_weight_files(directory: Path) -> list[Path]:
    """The top-level files of a checkpoint directory that are not weights or their index."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != INDEX
    )


def write_hf_checkpoint(
    buckets: Iterable[list[tuple[str, torch.Tensor]]],
    out_dir: str | Path,
    *,
    metadata_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
    force: bool = False,
) -> None:
    """Write the tensors of ``buckets`` (cast to ``dtype`` if given) and ``metadata_dir``'s
    non-weight files into ``out_dir``; ``config.json``'s dtype is set to the tensors' dtype."""
    metadata_dir = Path(metadata_dir)
    if not (metadata_dir / "config.json").is_file():
        raise FileNotFoundError(f"{metadata_dir}: no config.json")
    with atomic_output_dir(out_dir, force=force) as tmp:
        shards, written_dtype = _write_shards(buckets, tmp, dtype, max_shard_bytes)
        for source in non_weight_files(metadata_dir):
            shutil.copy2(source, tmp / source.name)
        _set_config_dtype(tmp / "config.json", written_dtype)
        _name_shards(tmp, shards)


def _write_shards(buckets, directory: Path, dtype, max_shard_bytes: int):
    """Shard files under provisional names; [(file, [(name, nbytes)])] and the tensors' dtype.
    Shards are ``buckets.bounded_buckets`` of the cast tensors."""
    written_dtype = None

    def cast_tensors():
        nonlocal written_dtype
        for bucket in buckets:
            for name, tensor in bucket:
                tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()
                if not _fp8_data(name, tensor):  # FP8 checkpoints keep bf16 as the model dtype
                    if written_dtype not in (None, tensor.dtype):
                        raise ValueError(f"{name}: dtype {tensor.dtype}, earlier tensors "
                                         f"{written_dtype}")
                    written_dtype = tensor.dtype
                yield name, tensor

    shards: list[tuple[Path, list[tuple[str, int]]]] = []
    for shard in bounded_buckets(cast_tensors(), max_shard_bytes):
        path = directory / f"shard-{len(shards):05d}.tmp"
        tensors = dict(shard)
        save_file(tensors, path, metadata={"format": "pt"})
        shards.append((path, [(n, t.nbytes) for n, t in tensors.items()]))
    if not shards:
        raise ValueError("no tensors to write")
    return shards, written_dtype


def _fp8_data(name: str, tensor: torch.Tensor) -> bool:
    """A block-FP8 weight or its scale grid (``rollout.fp8_weights``), not the model's dtype."""
    return tensor.dtype == torch.float8_e4m3fn or name.endswith(".weight_scale_inv")


def _name_shards(directory: Path, shards) -> None:
    """Final shard names, and the index when there is more than one shard."""
    if len(shards) == 1:
        shards[0][0].rename(directory / SINGLE)
        return
    weight_map, total = {}, 0
    for i, (path, tensors) in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        path.rename(directory / final)
        for name, nbytes in tensors:
            weight_map[name] = final
            total += nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Record ``dtype`` in config.json (``dtype``, or 4.x ``torch_dtype``) if it differs."""
    config = json.loads(config_path.read_text())
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    name = str(dtype).removeprefix("torch.")
    if config.get(key) != name:
        config[key] = name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
