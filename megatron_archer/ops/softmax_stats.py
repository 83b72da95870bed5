"""Per-token softmax statistics of a vocabulary slice, and how slices combine exactly (docs/numerics.md §1).

A slice of the vocabulary (a tensor-parallel shard, a tile of it, a split inside a kernel) is
summarised per token by three numbers. ``m`` is the slice's max raw logit z (before the
temperature T), and with x = (z - m) / T:

    s = sum_j exp(x_j)            b = sum_j exp(x_j) * x_j

Slices combine exactly after rescaling to a common max M, with d = (m - M) / T, alpha = exp(d):

    s -> alpha * s                b -> alpha * (b + d * s)

and the full-vocabulary results follow (``finalize``):

    logZ = M / T + log s      H = log s - b / s      logp = (z_y - M) / T - log s

This is docs/numerics.md §1's ``H = logZ - b/s`` with b taken about the max. Shifting the raw logits before
dividing by T keeps z - M exact, so logits of magnitude 1e4 lose nothing to the division, and
``log s >= 0``, ``-b / s >= 0`` make the entropy a sum of two non-negative terms (no cancellation).
"""

from __future__ import annotations

import math

import torch

from megatron_archer import distributed
from megatron_archer.nonfinite import NonFiniteError

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def slice_stats_(z: torch.Tensor, temperature: float = 1.0) -> Stats:
    """(m, s, b) per row of raw logits ``z`` [n, v] (floating point), overwritten as scratch.

    Rows whose entries are all -inf (or v == 0) give m = -inf, s = 0, b = 0: an empty slice.
    NaN or +inf entries make s NaN, which ``finalize`` reports.
    """
    if z.shape[-1] == 0:
        zeros = z.new_zeros(z.shape[:-1])
        return torch.full_like(zeros, -math.inf), zeros, zeros.clone()
    m = z.amax(dim=-1)
    shift = torch.where(m == -math.inf, 0.0, m)  # an all -inf row must not become -inf - -inf
    x = z.sub_(shift.unsqueeze(-1))
    if temperature != 1.0:
        x.div_(temperature)
    x.exp_()
    s = x.sum(dim=-1)
    # b = sum e * log(e) with e = exp(x - m): 0 * log 0 = 0 for -inf logits and padding.
    b = x.xlogy_(x).sum(dim=-1)
    return m, s, b


def rescale(
    m: torch.Tensor, s: torch.Tensor, b: torch.Tensor, new_m: torch.Tensor, temperature: float = 1.0
) -> Stats:
    """The stats (m, s, b) re-expressed relative to ``new_m >= m``."""
    empty = s == 0  # an empty slice contributes nothing, whatever its m
    delta = torch.where(empty, 0.0, (m - new_m) / temperature)
    alpha = torch.exp(delta)
    return new_m, alpha * s, alpha * (b + delta * s)


def merge(a: Stats, b: Stats, temperature: float = 1.0) -> Stats:
    """Stats of the union of two disjoint slices (an online-softmax step)."""
    new_m = torch.maximum(a[0], b[0])
    _, sa, ba = rescale(*a, new_m, temperature)
    _, sb, bb = rescale(*b, new_m, temperature)
    return new_m, sa + sb, ba + bb


def reduce_over_dim(
    m: torch.Tensor, s: torch.Tensor, b: torch.Tensor, dim: int, temperature: float = 1.0
) -> Stats:
    """Merge the slices laid out along ``dim`` (e.g. a kernel's vocabulary splits)."""
    new_m = m.amax(dim=dim, keepdim=True)
    _, s, b = rescale(m, s, b, new_m, temperature)
    return new_m.squeeze(dim), s.sum(dim=dim), b.sum(dim=dim)


def all_reduce_stats(
    m: torch.Tensor,
    s: torch.Tensor,
    b: torch.Tensor,
    label_logit: torch.Tensor,
    group,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge every rank's slice stats over ``group`` with two collectives of O(tokens) floats.

    ``label_logit`` holds the raw z_y on the rank that owns the label and 0 elsewhere, so a SUM
    recovers it. The MAX goes first; s, b and z_y then travel in one packed SUM.
    """
    global_m = distributed.all_reduce_(m.clone(), group, op="max")
    _, s, b = rescale(m, s, b, global_m, temperature)
    packed = distributed.all_reduce_(torch.stack([s, b, label_logit]), group, op="sum")
    return global_m, packed[0], packed[1], packed[2]


def finalize(
    m: torch.Tensor,
    s: torch.Tensor,
    b: torch.Tensor,
    label_logit: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logZ, entropy, logp) from full-vocabulary stats; raises NonFiniteError("logits") on a token
    with no finite logZ.

    ``label_logit`` is the raw z_y. For backward, recompute log-probs as (z - m) / T - log s
    rather than z / T - logZ, which loses precision for large logits.

    Call it with identical inputs on every tensor-parallel rank (after ``all_reduce_stats``) so
    that all ranks raise together instead of leaving the others waiting in a collective.
    """
    log_s = torch.log(s)
    bad = ~torch.isfinite(m + log_s)
    if bad.any():
        where = bad.flatten().nonzero().flatten()[:5].tolist()
        if (s.flatten()[where] == 0).all():
            raise NonFiniteError("logits", (
                f"logits: every entry is -inf (or vocabulary padding) for token(s) at flat index "
                f"{where}: no distribution to take log-probs or entropy of"))
        raise NonFiniteError("logits", (
            f"logits contain NaN or +inf (finite values or -inf are required); first affected "
            f"token(s) at flat index {where}"))
    entropy = log_s - b / s
    logp = (label_logit - m) / temperature - log_s
    return m / temperature + log_s, entropy, logp


def log_underflow(dtype: torch.dtype) -> float:
    """A log-probability below which exp() is exactly 0 in ``dtype``."""
    info = torch.finfo(dtype)
    return math.log(info.smallest_normal * info.eps) - 1.0


def logits_grad_(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    label_cols: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """d loss / d z for a vocabulary slice, given its log-probs ``logp`` [n, v] (overwritten).

    With p = exp(logp), x = z / T and ``scale`` = 1 / T, docs/numerics.md §1:

        d logp_y / d x_j = 1[j = y] - p_j        d H / d x_j = -p_j (logp_j + H)

    ``label_cols`` [n]: each row's label as a column of this slice; a value outside [0, v) means
    the label lies elsewhere (no host synchronisation to find which rows hit). Without an
    entropy gradient this needs no memory beyond ``logp``; with one, a second buffer of its size.
    """
    g_lp = grad_logp.unsqueeze(-1) * scale
    if grad_entropy is None:
        grad = logp.exp_().mul_(-g_lp)
    else:
        grad = logp.exp()
        # Where p underflows to 0 the product must be 0: keep logp finite there (no 0 * inf).
        coeff = logp.clamp_(min=log_underflow(logp.dtype)).add_(entropy.unsqueeze(-1))
        coeff.mul_(grad_entropy.unsqueeze(-1) * scale).add_(g_lp)
        grad.mul_(coeff).neg_()
    return add_at_labels_(grad, label_cols, g_lp[:, 0])


def label_hits(label_cols: torch.Tensor, width: int) -> torch.Tensor:
    """Which rows' label column lies in [0, ``width``): the slice holds their label."""
    return (label_cols >= 0) & (label_cols < width)


def add_at_labels_(grad: torch.Tensor, label_cols: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``grad[r, label_cols[r]] += values[r]`` for the rows whose label is in the slice, in place,
    elementwise (rows elsewhere add an exact 0 at column 0)."""
    width = grad.shape[-1]
    if width == 0:  # a rank whose slice is all padding
        return grad
    hit = label_hits(label_cols, width)
    index = label_cols.clamp(0, width - 1).unsqueeze(-1)
    return grad.scatter_add_(-1, index, torch.where(hit, values, 0.0).unsqueeze(-1).to(grad.dtype))


def gather_labels(z: torch.Tensor, label_cols: torch.Tensor) -> torch.Tensor:
    """``z[r, label_cols[r]]`` for the rows whose label is in the slice, 0 elsewhere."""
    width = z.shape[-1]
    if width == 0:  # a rank whose slice is all padding
        return z.new_zeros(z.shape[:-1])
    picked = z.gather(-1, label_cols.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(label_hits(label_cols, width), picked, 0.0)
