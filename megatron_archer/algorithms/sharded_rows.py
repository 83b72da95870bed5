"""Per-response statistics when a response's tokens are spread over the ranks of a group (docs/numerics.md §9).

Under context parallelism every rank of a CP group holds the same [B, T] response layout with a
mask that is True only at the tokens it holds (``actor.context_parallel``): the ranks hold
disjoint parts of the same responses, and the union of their masks is the unsplit mask. The
functions here return exactly what the unsplit computation (``order_stats.row_quantile``,
``row_rank_fraction``, a row sum) returns, wherever the tokens live. ``group=None`` (or a group
of one) is the unsplit computation itself.

- ``sharded_row_sums``: per-row sums of a masked quantity (token counts, selected counts, log
  weights), one all-reduce of [B] values.
- ``sharded_row_quantile``: the exact per-row quantile with linear interpolation, as
  torch.nanquantile on the masked values: a bisection on the values' IEEE bit patterns finds the
  floor(q (n - 1))-th smallest value of each row with one all-reduce of [B] counts per step (32
  steps in float32, 64 in float64), then one MIN all-reduce finds the next value for the
  interpolation. Nothing of size T is communicated.
- ``sharded_rows``: the unsplit rows themselves (one all-reduce of [B, T] values and counts), for
  what depends on every token's neighbours in order: mid-ranks (``archer_soft``) and the top-k
  of a micro-batch with ties broken by position.
- ``check_together``: input validation that raises on every rank of the group at once, since
  these functions run collectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_archer.algorithms.order_stats import row_quantile
from megatron_archer.distributed import all_reduce_, rank_and_size
from megatron_archer.nonfinite import TENSORS, NonFiniteError

# order keys of float32 values use their int32 bit patterns, of float64 values their int64 ones
_KEY_BITS = {torch.float32: 32, torch.float64: 64}


def _distributed(group) -> bool:
    return rank_and_size(group)[1] > 1


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of float32 or float64 ``values`` (IEEE bits, negatives flipped).

    Adding +0.0 turns -0.0 into +0.0, so the two zeros share a key as they compare equal.
    """
    bits = _KEY_BITS.get(values.dtype)
    if bits is None:
        raise ValueError(f"order keys need float32 or float64 values; got {values.dtype}")
    int_type = torch.int32 if bits == 32 else torch.int64
    raw = (values + 0.0).view(int_type).to(torch.int64)
    return torch.where(raw < 0, raw ^ (2 ** (bits - 1) - 1), raw)


def key_values(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` values of int64 order keys (inverse of ``order_keys``)."""
    bits = _KEY_BITS[dtype]
    raw = torch.where(keys < 0, keys ^ (2 ** (bits - 1) - 1), keys)
    return raw.to(torch.int32 if bits == 32 else torch.int64).view(dtype)


def sharded_row_sums(values: torch.Tensor, group=None) -> torch.Tensor:
    """[B] row sums of [B, T] ``values`` (zero where a rank holds no token) over ``group``."""
    sums = values.sum(dim=-1)
    return all_reduce_(sums, group) if _distributed(group) else sums


def sharded_rows(values: torch.Tensor, mask: torch.Tensor, group=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsplit rows (values, mask) of a group whose ranks hold disjoint tokens of [B, T] rows.

    Each rank contributes its values where its mask is True and zeros elsewhere; every position
    is held by at most one rank, so the sum is exact (x + 0 = x). Raises if two ranks claim a
    position. Values are detached.
    """
    if not _distributed(group) or mask.numel() == 0:  # the same layout on every rank
        return values.detach(), mask
    own = torch.where(mask, values.detach(), torch.zeros((), dtype=values.dtype, device=values.device))
    counts = all_reduce_(mask.to(torch.int32), group)
    full = all_reduce_(own.contiguous(), group)
    if bool((counts > 1).any()):
        raise ValueError("two ranks of the group hold the same token of a response "
                         "(their response masks overlap)")
    return full, counts > 0


def _local_counts_at_or_below(sorted_keys: torch.Tensor, local_n: torch.Tensor,
                              key: torch.Tensor) -> torch.Tensor:
    """[B] number of this rank's valid keys <= ``key`` per row (invalid keys sort last, as +max)."""
    found = torch.searchsorted(sorted_keys, key.to(sorted_keys.device)[:, None], right=True)[:, 0]
    return torch.minimum(found.cpu(), local_n)


def _smallest_with_count(sorted_keys, local_n, want, bits, group) -> torch.Tensor:
    """[B] the smallest key K per row with at least ``want`` keys <= K over the group (bisection).

    The bisection state is a CPU control tensor (distributed.py's device rule), identical on every
    rank after each all-reduce, so every rank runs the same steps. Rows with want > count end at
    the largest key; the caller discards them.
    """
    low = torch.full_like(want, -(2 ** (bits - 1)))
    high = torch.full_like(want, 2 ** (bits - 1) - 1)
    while bool((low < high).any()):
        mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2), no overflow
        counts = _local_counts_at_or_below(sorted_keys, local_n, mid)
        enough = all_reduce_(counts, group) >= want
        active = low < high
        high = torch.where(active & enough, mid, high)
        low = torch.where(active & ~enough, mid + 1, low)
    return low


def sharded_row_quantile(values: torch.Tensor, mask: torch.Tensor, q: float, group=None
                         ) -> torch.Tensor:
    """[B] quantile ``q`` of each row's valid values over all ranks of ``group`` (module docstring).

    Equals ``order_stats.row_quantile`` on the unsplit rows: the same two order statistics and the
    same interpolation, in ``values.dtype`` (float32 or float64). NaN for a row without a valid
    value on any rank. Every rank of ``group`` must call it with the same [B, T] layout.
    """
    if not _distributed(group):
        return row_quantile(values, mask, q)
    dtype = values.dtype
    bits = _KEY_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"sharded_row_quantile needs float32 or float64 values; got {dtype}")
    if values.numel() == 0:  # the same layout on every rank: all of them skip the collectives
        return torch.full(values.shape[:1], float("nan"), dtype=dtype, device=values.device)
    keys = torch.where(mask, order_keys(values.detach()),
                       torch.full((), 2 ** (bits - 1) - 1, dtype=torch.int64, device=values.device))
    sorted_keys = keys.sort(dim=-1).values
    local_n = mask.sum(dim=-1).cpu()
    counts = all_reduce_(local_n.clone(), group)
    # the interpolation position exactly as row_quantile computes it
    position = q * (counts - 1).clamp_min(0).to(dtype)
    below = position.floor().long()
    above = position.ceil().long()
    low_key = _smallest_with_count(sorted_keys, local_n, below + 1, bits, group)
    # the next value: the same when enough values tie at the low one, else the smallest above it
    at_or_below = all_reduce_(_local_counts_at_or_below(sorted_keys, local_n, low_key), group)
    # this rank's smallest key above low_key: the first after its keys <= low_key (invalid
    # positions hold the largest key, so a rank without one offers the largest key)
    index = _local_counts_at_or_below(sorted_keys, local_n, low_key).clamp_max(keys.shape[-1] - 1)
    candidate = sorted_keys.gather(-1, index.to(keys.device)[:, None])[:, 0].cpu()
    next_key = all_reduce_(candidate, group, op="min")
    high_key = torch.where(at_or_below >= above + 1, low_key, next_key)
    device = values.device
    low_value = key_values(low_key, dtype).to(device)
    high_value = key_values(high_key, dtype).to(device)
    quantile = torch.lerp(low_value, high_value, (position - below.to(dtype)).to(device))
    return torch.where(counts.to(device) > 0, quantile, torch.full_like(quantile, float("nan")))


def check_together(check: Callable[[], None], group=None) -> None:
    """Run ``check`` (input validation raising ValueError) and raise on every rank of ``group``
    when it raised on any: a rank raising alone would leave the others waiting in the next
    collective. Other ranks raise a NonFiniteError naming the same tensor (so the actor's
    non-finite policy treats the micro-batch alike everywhere), or a ValueError. One all-reduce.
    """
    try:
        check()
        problem = None
    except ValueError as error:
        problem = error
    if not _distributed(group):
        if problem is not None:
            raise problem
        return
    if problem is None:
        code = 0
    elif isinstance(problem, NonFiniteError):
        code = 1 + TENSORS.index(problem.tensor)
    else:
        code = 1 + len(TENSORS)
    code = int(all_reduce_(torch.tensor([code], dtype=torch.int64), group, op="max"))
    if problem is not None:
        raise problem
    if 0 < code <= len(TENSORS):
        name = TENSORS[code - 1]
        raise NonFiniteError(name, f"{name} is non-finite on another rank holding these responses")
    if code:
        raise ValueError("another rank holding these responses passed invalid inputs")
