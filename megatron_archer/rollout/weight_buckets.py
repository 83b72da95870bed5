"""Weight buckets on their way to an inference server: the tensor serialisation SGLang's
``/update_weights_from_tensor`` expects (gathered from every GPU of the host for colocated
servers), and the metadata that ``/update_weights_from_distributed`` announces before a
broadcast. Re-bucketing to a size bound is ``megatron_archer.buckets``."""

from __future__ import annotations

import base64
import io
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
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


@dataclass(frozen=True)
class DeviceHandles:
    """One bucket serialised on each device of rank 0's host: ``by_device[i]`` holds the handles
    of the copy on GPU i (the device index the sender reported). A colocated server on GPU i loads
    its weights from there, so no server opens handles on another GPU."""

    by_device: dict[int, str]


def gather_device_handles(
    buckets: Iterable[Bucket], device_index: int, group
) -> Iterator[DeviceHandles | None]:
    """Every rank: serialise each bucket (``serialize_named_tensors``) and gather the strings to
    rank 0 of ``group`` (a CPU control group); rank 0 yields a ``DeviceHandles`` of the ranks on
    its own host, the others None. After each yield, a barrier keeps every sender's tensors alive
    until rank 0 has handed that bucket over. Collective: every rank iterates to the end."""
    rank = dist.get_rank(group)
    host = socket.gethostname()
    for bucket in buckets:
        mine = (host, device_index, serialize_named_tensors(bucket))
        gathered = [None] * dist.get_world_size(group) if rank == 0 else None
        dst = 0 if group is None else dist.get_global_rank(group, 0)
        dist.gather_object(mine, gathered, dst=dst, group=group)
        if rank == 0:
            by_device: dict[int, str] = {}
            for sender_host, index, serialized in gathered:
                if sender_host == host:
                    by_device.setdefault(index, serialized)
            yield DeviceHandles(by_device)
        else:
            yield None
        dist.barrier(group=group)
