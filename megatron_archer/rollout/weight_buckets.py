"""Weight buckets on their way to an inference server: the tensor serialisation SGLang's
``/update_weights_from_tensor`` expects (gathered from every GPU of the host for colocated
servers; a host copy for a server on a GPU that does not hold the tensors), and the metadata
that ``/update_weights_from_distributed`` announces before a broadcast. Re-bucketing to a size
bound is ``megatron_archer.buckets``."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler

import torch
import torch.distributed as dist
from torch.multiprocessing import reductions  # also registers torch's tensor reductions

from megatron_archer.buckets import Bucket


def serialize_named_tensors(bucket: Bucket) -> str:
    """``[(name, tensor), ...]`` pickled by torch's ForkingPickler and base64-encoded: the format
    of SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``. CUDA tensors travel
    as IPC handles (the sender must keep them alive until the server has loaded them) naming
    their GPU by UUID, as SGLang's own reduction does: its receiver maps the UUID to its own
    device numbering, which differs from the sender's under another ``CUDA_VISIBLE_DEVICES``.
    CPU tensors travel through shared memory named by file (torch's ``file_system`` strategy,
    whatever this process's own): the default strategy's file descriptors go through
    multiprocessing's resource sharer, which only this process's own children can authenticate
    to, not a server. Either way only the same host can read them."""
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    pickler.dispatch_table[torch.Tensor] = _reduce_naming_gpu_by_uuid
    with _sharing_by_file_name():
        pickler.dump([(name, tensor.detach()) for name, tensor in bucket])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_SHARING_LOCK = threading.Lock()


@contextmanager
def _sharing_by_file_name():
    """torch's sharing strategy ``file_system`` for the duration (read by its CPU storage
    reduction), restored afterwards; one thread at a time."""
    with _SHARING_LOCK:
        saved = torch.multiprocessing.get_sharing_strategy()
        torch.multiprocessing.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            torch.multiprocessing.set_sharing_strategy(saved)


def bucket_device_key(bucket: Bucket) -> str | None:
    """``device_key`` of the GPU that holds every tensor of ``bucket``; None for CPU tensors (or
    tensors on several devices)."""
    devices = {tensor.device for _, tensor in bucket}
    if len(devices) != 1:
        return None
    (device,) = devices
    return device_key(device.index) if device.type == "cuda" else None


def to_host(bucket: Bucket) -> Bucket:
    """``bucket`` copied to host memory: what a server rank on another GPU is sent (through
    shared memory), so that it copies the weights to its GPU itself and no process opens a CUDA
    context on a GPU it does not otherwise use."""
    return [(name, tensor.detach().to("cpu")) for name, tensor in bucket]


# the device index among the arguments of torch's ``reduce_tensor`` for a CUDA tensor (the
# position SGLang's receiver rewrites too: torch has not changed the signature for years)
_DEVICE_ARG = 6


def _reduce_naming_gpu_by_uuid(tensor: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        args = (*args[:_DEVICE_ARG], gpu_uuid(args[_DEVICE_ARG]), *args[_DEVICE_ARG + 1:])
    return rebuild, args


def gpu_uuid(device_index: int) -> str:
    """The UUID of this process's GPU ``device_index``, as SGLang's receiver compares it."""
    return str(torch.cuda.get_device_properties(device_index).uuid)


def device_key(device_index: int) -> str:
    """What ``DeviceHandles`` calls this process's device ``device_index``: its GPU's UUID; on
    a machine without CUDA, ``cpu:<index>`` stands in for it (tests of the same logic)."""
    return gpu_uuid(device_index) if torch.cuda.is_available() else f"cpu:{device_index}"


_LIST_UUIDS = ("import json, torch; print(json.dumps([str(torch.cuda.get_device_properties(i).uuid)"
               " for i in range(torch.cuda.device_count())]))")


def visible_device_keys(env: Mapping[str, str]) -> list[str] | None:
    """The UUIDs of the GPUs that a process started with ``env`` numbers 0, 1, ...: listed by a
    Python child with that environment, so CUDA's own order under its ``CUDA_VISIBLE_DEVICES``
    and ``CUDA_DEVICE_ORDER`` decides. None without CUDA here (``device_key``'s stand-ins are
    then the indices themselves)."""
    if not torch.cuda.is_available():
        return None
    listed = subprocess.run([sys.executable, "-c", _LIST_UUIDS], env=dict(env), text=True,
                            capture_output=True, timeout=300)
    if listed.returncode != 0:
        raise RuntimeError(f"listing the GPUs the servers see failed: {listed.stderr.strip()}")
    return json.loads(listed.stdout.strip().splitlines()[-1])


def bucket_metadata(bucket: Bucket) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtype names (``torch.<name>``, e.g. "bfloat16") and shapes of a bucket."""
    names = [name for name, _ in bucket]
    dtypes = [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket]
    shapes = [list(tensor.shape) for _, tensor in bucket]
    return names, dtypes, shapes


@dataclass(frozen=True)
class DeviceHandles:
    """One bucket serialised on each device of rank 0's host: ``by_device[uuid]`` holds the
    handles of the copy on the GPU of that UUID (the same in every process, whatever its
    ``CUDA_VISIBLE_DEVICES``). A colocated server loads its weights from its own GPUs' copies,
    so no server opens handles on another GPU."""

    by_device: dict[str, str]


def gather_device_handles(
    buckets: Iterable[Bucket], device_uuid: str, group
) -> Iterator[DeviceHandles | None]:
    """Every rank: serialise each bucket (``serialize_named_tensors``) and gather the strings to
    rank 0 of ``group`` (a CPU control group); rank 0 yields a ``DeviceHandles`` of the ranks on
    its own host, the others None. After each yield, a barrier keeps every sender's tensors alive
    until rank 0 has handed that bucket over. Collective: every rank iterates to the end."""
    rank = dist.get_rank(group)
    host = socket.gethostname()
    for bucket in buckets:
        mine = (host, device_uuid, serialize_named_tensors(bucket))
        gathered = [None] * dist.get_world_size(group) if rank == 0 else None
        dst = 0 if group is None else dist.get_global_rank(group, 0)
        dist.gather_object(mine, gathered, dst=dst, group=group)
        if rank == 0:
            by_device: dict[str, str] = {}
            for sender_host, uuid, serialized in gathered:
                if sender_host == host:
                    by_device.setdefault(uuid, serialized)
            yield DeviceHandles(by_device)
        else:
            yield None
        dist.barrier(group=group)
