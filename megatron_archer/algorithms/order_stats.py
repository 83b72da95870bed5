"""Order statistics of per-token entropy: top-k counts, per-response quantiles and ranks, and an
exact k-th largest value over all data-parallel ranks.

Per-response functions take [B, T] values and a bool [B, T] mask of the valid tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from megatron_archer.distributed import all_reduce_

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def top_count(rho: float, n: int) -> int:
    """k = ceil(rho * n), the number of tokens in the top-rho fraction of n (0 < rho <= 1).

    A relative slack of 1e-12 keeps float rounding from adding a token (0.1 * 10 is exactly 1, not 2);
    any n >= 1 gives k >= 1.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(rho * n * (1.0 - 1e-12))))


def _sorted_rows(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid values in ascending order, padded with +inf; and the count of valid values."""
    padded = torch.where(mask, values, torch.full_like(values, float("inf")))
    return padded.sort(dim=-1).values, mask.sum(dim=-1)


def row_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """[B] quantile ``q`` of each row's valid values, linear interpolation (as torch.nanquantile).

    Rows without a valid value give NaN (no token compares above it), also when the layout has
    no column at all (every response of the micro-batch empty).
    """
    if values.shape[-1] == 0:
        return values.new_full(values.shape[:-1], float("nan"))
    ordered, counts = _sorted_rows(values, mask)
    position = q * (counts - 1).clamp_min(0).to(values.dtype)
    below = position.floor().long()
    above = position.ceil().long()
    low = ordered.gather(-1, below[:, None]).squeeze(-1)
    high = ordered.gather(-1, above[:, None]).squeeze(-1)
    quantile = torch.lerp(low, high, position - below.to(values.dtype))
    return torch.where(counts > 0, quantile, torch.full_like(quantile, float("nan")))


def row_rank_fraction(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mid-rank of each valid value within its row, scaled to [0, 1]: 0 smallest, 1 largest.

    Tied values share their average rank; a row's single value has rank 0; 0 outside the mask.
    """
    ordered, counts = _sorted_rows(values, mask)
    queries = torch.where(mask, values, torch.zeros_like(values)).contiguous()
    below = torch.searchsorted(ordered, queries, right=False)
    at_or_below = torch.searchsorted(ordered, queries, right=True)
    mid_rank = below.to(values.dtype) + (at_or_below - below - 1).to(values.dtype) / 2
    fraction = mid_rank / (counts - 1).clamp_min(1).to(values.dtype)[:, None]
    return torch.where(mask, fraction, torch.zeros_like(fraction))


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float32 values (IEEE bit pattern, negatives flipped).

    Adding +0.0 turns -0.0 into +0.0, so the two zeros share a key as they compare equal.
    """
    bits = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ _INT32_MAX, bits)


def _key_value(key: int) -> float:
    """The float32 value of an order key (inverse of ``_order_key``)."""
    bits = key ^ _INT32_MAX if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


def floor_count(ratio: float, n: int) -> int:
    """k = max(1, floor(ratio * n)) for n >= 1, 0 for n = 0: the covariance methods' token budget
    (docs/numerics.md §10). A relative slack of 1e-12 keeps float rounding from losing a token
    (0.29 * 100 is 28.999..., not 29)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(ratio * n * (1.0 + 1e-12))))


def kth_largest_key(keys: Sequence[torch.Tensor], ks: Sequence[int], low: int, high: int,
                    group=None) -> list[int]:
    """For each k in ``ks``, the exact k-th largest of all int64 ``keys`` on all ranks.

    ``keys`` are 1-D int64 tensors (this rank's, e.g. one per micro-batch) with values in
    [low, high]. Nothing is gathered: a bisection over [low, high] needs one all-reduce of
    len(ks) counts per step, ceil(log2(high - low + 1)) steps, identical on every rank. Ties count
    with their multiplicity. Every k must be >= 1 and at most the global count of keys (the
    result is ``low`` otherwise); every rank passes the same ``ks``, ``low`` and ``high``.
    """
    flat = torch.cat([k.reshape(-1) for k in keys]).sort().values if keys else \
        torch.zeros(0, dtype=torch.int64)
    # the bisection state and the counts all-reduced are CPU control values whatever the keys'
    # device, so every rank reduces on the same device (distributed.py's device rule)
    want = torch.tensor([max(int(k), 1) for k in ks], dtype=torch.int64)
    lo = torch.full_like(want, low)
    hi = torch.full_like(want, high)
    while bool((lo < hi).any()):
        mid = (lo >> 1) + (hi >> 1) + ((lo | hi) & 1)  # ceil((lo + hi) / 2), no int64 overflow
        below = torch.searchsorted(flat, mid.to(flat.device), right=False).cpu()
        enough = all_reduce_(flat.numel() - below, group) >= want
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid - 1)
    return lo.tolist()


def kth_largest(values: Sequence[torch.Tensor], ks: Sequence[int], group=None) -> list[float]:
    """For each k in ``ks``, the exact k-th largest float32 value of all ``values`` on all ranks.

    ``values`` are 1-D tensors (this rank's valid entries, e.g. one per micro-batch), compared in
    float32, by bisection over their 2^32 order keys (``kth_largest_key``, 32 all-reduces of
    len(ks) counts). Ties count with their multiplicity, so ``x >= kth_largest`` holds for at
    least k values (more when the k-th is tied). k <= 0 gives +inf; every rank must pass the same
    ``ks``, each at most the global count.
    """
    keys = kth_largest_key([_order_key(v.detach().reshape(-1)) for v in values], ks,
                           _INT32_MIN, _INT32_MAX, group)
    result = []
    for k, key in zip(ks, keys):
        if k <= 0:
            result.append(float("inf"))
        elif key == _INT32_MIN:  # no key had k values at or above it: k exceeds the global count
            raise ValueError(f"k = {k} exceeds the number of values on all ranks")
        else:
            result.append(_key_value(key))
    return result
