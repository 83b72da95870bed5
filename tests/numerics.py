"""Float comparisons whose bounds follow from the arithmetic, not from one machine's error.

Two float32 computations of the same maths that sum in different orders (another kernel, another
layout, another vector width) differ by rounding, and how much depends on the CPU's BLAS/oneDNN
kernels. So a test never bounds ``|tested - baseline|`` by a number seen on one machine. It runs
the same maths in float64 too and asks the tested path to be about as accurate as the baseline
path it replaces::

    max|tested - ref64| <= FACTOR * max|baseline - ref64| + FLOOR_ULPS * eps(dtype) * max|ref64|

The factor allows for an unlucky summation order (the error of a length-n float sum grows like
sqrt(n) to n times eps, and two orders rarely differ by more than a small factor); the floor
covers a baseline that happens to be exact (its error can be zero: a tested path must then still
be allowed a few rounding steps of the computation's scale). That scale is the output's
magnitude unless the output is a difference of larger terms: a log-prob or an entropy (logsumexp
minus a logit, or minus the mean logit) rounds at the scale of the logits, so those tests pass
``scale=max|logit|``; an entropy of 1e-13 computed from logits of 60 is exact to only ~1e-5.
A wrong tested path (a dropped term, a scale off by 1e-3 relative) fails by orders of magnitude.
Where no float64 run exists, a test derives its bound from ``eps``, the reduction length and the
magnitudes, and says how in a comment.

Same computation, same process (determinism, resume, a refactor that must not change a bit):
compare bitwise, not with this module.
"""

from __future__ import annotations

import torch

FACTOR = 4.0
FLOOR_ULPS = 8


def _tensor(x) -> torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a float dtype (float32: 2^-23, bfloat16: 2^-7)."""
    return torch.finfo(dtype).eps


def accuracy_failure(what: str, tested, baseline, reference, *, dtype: torch.dtype | None = None,
                     scale: float | None = None, factor: float = FACTOR,
                     floor_ulps: float = FLOOR_ULPS) -> str | None:
    """None when ``tested`` is as accurate as ``baseline`` against the float64 ``reference`` (the
    module's rule), else a line naming ``what`` and both errors. Tensors of one shape, or floats;
    ``dtype`` (default: the tested tensor's, float32 for a Python float) sets the floor's eps,
    ``scale`` (default: max|reference|) its magnitude."""
    tested, baseline, reference = _tensor(tested), _tensor(baseline), _tensor(reference)
    if not tested.shape == baseline.shape == reference.shape:
        return f"{what}: shapes {tuple(tested.shape)}, {tuple(baseline.shape)}, {tuple(reference.shape)}"
    if tested.numel() == 0:
        return None
    dtype = dtype or (tested.dtype if tested.dtype != torch.float64 else torch.float32)
    reference = reference.double()
    if not bool(torch.isfinite(reference).all()):
        return f"{what}: the float64 reference is not finite"
    error = (tested.double() - reference).abs().max().item()
    base_error = (baseline.double() - reference).abs().max().item()
    scale = reference.abs().max().item() if scale is None else scale
    floor = floor_ulps * eps(dtype) * scale
    bound = factor * base_error + floor
    if not error <= bound:  # also catches NaN
        return (f"{what}: error {error:.3g} vs float64 > {factor:g} x baseline's {base_error:.3g} "
                f"+ floor {floor:.3g}")
    return None


def assert_as_accurate(tested, baseline, reference, what: str = "value", **kwargs) -> None:
    """``accuracy_failure`` as an assertion."""
    failure = accuracy_failure(what, tested, baseline, reference, **kwargs)
    assert failure is None, failure
