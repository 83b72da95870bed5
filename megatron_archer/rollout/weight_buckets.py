"""Weight buckets on their way to an inference server: the tensor serialisation SGLang's
``/update_weights_from_tensor`` expects, and the metadata that ``/update_weights_from_distributed``
announces before a broadcast. Re-bucketing to a size bound is ``megatron_archer.buckets``."""

from __future__ import annotations

import base64
import io
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

from megatron_archer.buckets import Bucket


def serialize_named_tensors(bucket: Bucket) -> str:
    """``[(name, tensor), ...]`` pickled by torch's ForkingPickler and base64-encoded: the format
    of SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``. CUDA tensors travel
    as IPC handles (the sender must keep them alive until the server has loaded them), CPU
    tensors through shared memory; either way only the same host can read them."""
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump([(name, tensor.detach()) for name, tensor in bucket])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def bucket_metadata(bucket: Bucket) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtype names (``torch.<name>``, e.g. "bfloat16") and shapes of a bucket."""
    names = [name for name, _ in bucket]
    dtypes = [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket]
    shapes = [list(tensor.shape) for _, tensor in bucket]
    return names, dtypes, shapes
