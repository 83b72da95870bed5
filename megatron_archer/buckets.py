"""Size-bounded buckets of named tensors: the unit in which weights travel (export, engine sync).

A bucket is a list of ``(hf_name, tensor)`` pairs; bounding its bytes bounds the memory a gather,
a serialisation or a broadcast needs at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Bucket = list[tuple[str, torch.Tensor]]


def bounded_buckets(pairs: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[Bucket]:
    """Group ``(name, tensor)`` pairs, in order, into buckets of at most ``max_bytes`` each;
    a tensor larger than that travels alone."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive")
    bucket: Bucket = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
