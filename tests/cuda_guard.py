"""A CPU stand-in for CUDA tensors that enforces ``megatron_archer.distributed``'s device rule.

``FakeCuda`` is a wrapper tensor subclass (``torch.Tensor._make_wrapper_subclass``) whose
``.device`` reads ``cuda:0`` while it computes on an inner CPU tensor: inside ``fake_cuda()`` a
torch-function mode unwraps every op's FakeCuda arguments, runs the op, and rewraps the results.
Unlike ``FakeTensorMode`` it runs data-dependent code (``.item()``, ``bool()``, finiteness checks).
Like a real CUDA tensor it refuses to meet a plain CPU tensor of one or more dimensions in one op
(``MixedDeviceError``; CPU index tensors and explicit copies excepted, as on CUDA); 0-dim CPU
tensors act as scalars, as torch allows; ``.numpy()`` refuses.

``fake_cuda()`` is the context a test runs code in:

- factory functions and moves asked for a ``cuda`` device (``torch.zeros(..., device=x.device)``,
  ``t.to("cuda")``, ``t.cuda()``) make ``FakeCuda`` tensors instead of failing on the CPU build;
- ``torch.distributed`` collectives are patched as the process group of ``init_process_group`` on
  a CUDA machine would behave: a tensor on a device the group's backend
  (``distributed.process_group_backend(cuda=True)``) does not serve is refused, as an NCCL-only group refuses CPU
  tensors ("No backend type associated with device type cpu"), and a collective whose tensor
  sits on different devices on different ranks raises on every rank (it would hang);
  ``FakeCuda`` tensors are reduced through their inner CPU tensor over the real gloo group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from megatron_archer.distributed import process_group_backend

FAKE_DEVICE = torch.device("cuda", 0)


class MixedDeviceError(RuntimeError):
    """An op got a CUDA tensor and a CPU tensor of one or more dimensions."""


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its process group does not serve, or on different
    devices on different ranks."""


def served_devices(backend: str) -> set[str]:
    """Device types a group with ``backend`` runs collectives on: "nccl" -> {"cuda"},
    "cpu:gloo,cuda:nccl" -> {"cpu", "cuda"}."""
    by_name = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}}
    devices: set[str] = set()
    for part in backend.lower().split(","):
        device, sep, _ = part.partition(":")
        devices |= {device} if sep else by_name[device]
    return devices


_OWN_ATTRIBUTES = {torch.Tensor.device.__get__, torch.Tensor.is_cuda.__get__,
                   torch.Tensor.is_cpu.__get__, torch.Tensor.get_device}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_COPIES = {torch.Tensor.copy_}  # an explicit cross-device copy, allowed on CUDA


class FakeCuda(torch.Tensor):
    """A tensor that says it is on ``cuda:0`` and computes on ``self.inner`` (a CPU tensor).

    The inner tensor carries autograd (``requires_grad``, ``grad``, ``backward`` are its own).
    Ops are intercepted at the torch-function level by ``fake_cuda()``'s mode: at the dispatch
    level alone, torch 2.13's CPU build fails indexing, ``nonzero`` and ``torch.where`` with a
    Python scalar on a ``cuda`` wrapper ("PyTorch is not linked with support for cuda devices").
    """

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        if isinstance(inner, FakeCuda) or inner.device.type != "cpu":
            raise TypeError("FakeCuda wraps a plain CPU tensor")
        out = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, device=FAKE_DEVICE)
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"FakeCuda({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: FakeCuda tensors compute only inside tests.cuda_guard.fake_cuda()")


def _is_cuda(device) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type == "cuda"


def _is_cpu(device) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type == "cpu"


def _move_target(func, args, kwargs):
    """The device a ``Tensor.to`` / ``.cuda`` / ``.cpu`` call moves to, or None."""
    if func is torch.Tensor.cuda:
        return FAKE_DEVICE
    if func is torch.Tensor.cpu:
        return torch.device("cpu")
    if func is torch.Tensor.to:
        device = kwargs.get("device")
        if device is None and len(args) > 1 and isinstance(args[1], (str, torch.device)):
            device = args[1]
        if device is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            device = args[1].device
        return None if device is None else torch.device(device)
    return None


def _mixed(func, args, kwargs) -> torch.Tensor | None:
    """A plain CPU tensor of >= 1 dimension that meets a FakeCuda one in this call, or None."""
    flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    if not any(isinstance(x, FakeCuda) for x in flat):
        return None
    if func in _COPIES:
        return None
    candidates = flat
    if func in _INDEXING:  # CPU index tensors are moved by torch; a set value is not
        candidates = [args[0]] + ([args[2]] if func is torch.Tensor.__setitem__ else [])
        candidates = [x for x in candidates if isinstance(x, torch.Tensor)]
    return next((x for x in candidates if not isinstance(x, FakeCuda) and x.dim() >= 1), None)


def _unwrap(x):
    return x.inner if isinstance(x, FakeCuda) else x


def _wrap(x):
    return FakeCuda(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCuda) else x


class _FakeCudaMode(TorchFunctionMode):
    """Every torch call inside ``fake_cuda()``: CUDA factories and moves make FakeCuda tensors,
    ops on FakeCuda tensors run on their inner tensors and refuse a mixed CPU operand."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrapped = any(isinstance(x, FakeCuda) for x in tree_flatten((args, kwargs))[0])
        if func in _OWN_ATTRIBUTES and wrapped:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is torch.Tensor.numpy and wrapped:
            raise TypeError("can't convert cuda:0 device type tensor to numpy (FakeCuda)")
        target = _move_target(func, args, kwargs)
        if target is not None:
            plain = _unwrap(args[0])
            rest = [None if isinstance(a, (str, torch.device, torch.Tensor)) else a
                    for a in args[1:2]] + list(args[2:])
            rest = [a for a in rest if a is not None]
            options = {k: v for k, v in kwargs.items() if k != "device"}
            moved = plain if func is not torch.Tensor.to else plain.to(*rest, **options)
            return moved if target.type == "cpu" else _wrap(moved)
        problem = _mixed(func, args, kwargs)
        if problem is not None:
            name = getattr(func, "__name__", str(func))
            raise MixedDeviceError(
                f"{name}: a CUDA tensor met a CPU tensor of shape {tuple(problem.shape)}")
        device = kwargs.get("device")
        if _is_cuda(device):
            kwargs = {**kwargs, "device": "cpu"}
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if _is_cpu(device) or not (wrapped or _is_cuda(device)):
            return out
        if func is torch.Tensor.tolist or func is torch.Tensor.item:
            return out
        return tree_map(_wrap, out)


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor",
                "reduce_scatter_tensor")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _guarded(name: str, real, backend: str, real_all_reduce):
    served = served_devices(backend)

    def collective(*args, **kwargs):
        tensors = _tensors(list(args) + list(kwargs.values()))
        devices = {t.device.type for t in tensors}
        refused = devices - served
        group = kwargs.get("group")
        # every rank must reduce on the same device: compare over the real (gloo) group
        flags = torch.tensor([int("cuda" in devices), -int("cuda" in devices)])
        real_all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if flags[0] != -flags[1]:
            raise CollectiveDeviceError(f"{name}: the tensor is on CUDA on some ranks, CPU on others")
        if refused:
            raise CollectiveDeviceError(
                f"{name}: no backend for device type {', '.join(sorted(refused))} in a group "
                f"created with backend {backend!r}")

        def unwrap(x):
            return x.inner if isinstance(x, FakeCuda) else x

        return real(*[tree_map(unwrap, a) for a in args],
                    **{k: tree_map(unwrap, v) for k, v in kwargs.items()})

    return collective


@contextlib.contextmanager
def fake_cuda(backend: str | None = None) -> Iterator[None]:
    """Run the block as if on a CUDA machine (see the module docstring). ``backend`` is the
    process-group backend the collectives emulate: by default the one ``init_process_group``
    uses on CUDA; ``"nccl"`` models an NCCL-only group."""
    backend = backend or process_group_backend(cuda=True)
    saved = {name: getattr(dist, name) for name in _COLLECTIVES}
    try:
        for name, real in saved.items():
            setattr(dist, name, _guarded(name, real, backend, saved["all_reduce"]))
        with _FakeCudaMode():
            yield
    finally:
        for name, real in saved.items():
            setattr(dist, name, real)
