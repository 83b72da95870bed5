"""Covariance-based token selection: Clip-Cov and KL-Cov (docs/numerics.md §10; Cui et al. 2025,
"The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models").

Each valid token t of the optimiser step gets the centred cross-product of its log-prob and its
advantage, ``cov_t = (A_t - mean A) (logp_t - mean logp)``, the means over all of the step's
valid tokens (every micro-batch on every data- and context-parallel rank). The step constants
(the two means, the Clip-Cov draw threshold, the KL-Cov rank threshold) are taken once per
update from the old policy's log-probs (``build_step_context``); the forward then classifies each
token with its own ``cov_t`` against them, so a token's fate depends only on its own values and
the step constants, never on how the step is split.

Exactness: the means are of the values rounded to multiples of 2^-53 (exact for float32 inputs
of magnitude above 2^-30), summed exactly in two int64 parts and divided once, correctly
rounded, so they are the same bits on every split; the thresholds are exact order statistics
over all ranks (``order_stats.kth_largest_key``). The random draw of Clip-Cov and the tie-break
of KL-Cov use a 32-bit hash of (salts, the response's id, the token's position in the response)
(``token_hash``): a function of the token's identity, not of the order it is seen in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_archer.algorithms.config import SelectionConfig
from megatron_archer.algorithms.order_stats import floor_count, kth_largest_key
from megatron_archer.algorithms.sharded_rows import order_keys
from megatron_archer.algorithms.validation import require_finite, require_token_tensor
from megatron_archer.distributed import all_reduce_

# means are of the values rounded to multiples of 2^-53, summed as two int64 parts:
# round(v 2^53) = high 2^29 + low with high = round(v 2^24) and |low| <= 2^28 (module docstring)
_HIGH_BITS, _LOW_BITS = 24, 29
_SUM_LIMIT = 2.0 ** 62  # sum of |v| 2^24 over the step must stay below it (no int64 overflow)
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^27: a 32-bit value times it stays below 2^59, so int64 never overflows
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _mix32(x):
    """A bijection of 32-bit integers (xor-shift-multiply), the same bits on Python ints and on
    int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def token_hash(salts: Sequence[int], sequence_ids: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width] int64 hashes in [0, 2^32) of (salts, sequence id, position in the response).

    ``sequence_ids`` [B] identify the responses (the trainer: ``content_ids``; any ids fixed
    before the step is split); ``salts`` vary the draw (the trainer passes seed, step, epoch and
    update).
    h = mix(mix(r_i ^ t) ^ r_i) with r_i = mix(salt ^ id_i): distinct tokens of a step collide
    only by chance (about 2^-32 a pair), never along a run of positions.
    """
    ids = sequence_ids.to(torch.int64)
    if ids.dim() != 1 or bool((ids < 0).any()):
        raise ValueError(f"sequence_ids must be a 1-D tensor of non-negative ids; got shape "
                         f"{tuple(sequence_ids.shape)}")
    base = 0
    for salt in salts:
        base = _mix32(base ^ (int(salt) & _MASK32))
    rows = _mix32((ids & _MASK32) ^ base)[:, None]
    positions = torch.arange(width, dtype=torch.int64, device=ids.device)[None, :]
    return _mix32(_mix32(rows ^ positions) ^ rows)


def content_ids(sequences: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B] int64 ids in [0, 2^32) of 1-D token-id sequences (prompt and response), from their
    content: mix(sum_t mix(token_t ^ mix(t + 1)) mod 2^32). A sequence id for ``token_hash`` that
    every rank derives alone; identical sequences (the same tokens, so the same log-probs and
    advantages) share it."""
    ids = []
    for tokens in sequences:
        tokens = tokens.to(torch.int64).cpu() & _MASK32
        tags = _mix32(torch.arange(1, tokens.numel() + 1, dtype=torch.int64))
        ids.append(int(_mix32(int(_mix32(tokens ^ tags).sum()) & _MASK32)))
    return torch.tensor(ids, dtype=torch.int64)


@dataclass(frozen=True)
class CovarianceTokens:
    """One micro-batch's inputs: detached log-probs [B, T], advantages [B] or [B, T], and
    ``token_hash`` [B, T] (``token_hash(...)``, sliced to T columns)."""

    logp: torch.Tensor
    advantages: torch.Tensor
    token_hash: torch.Tensor

    def check(self, response_mask: torch.Tensor, what: str = "") -> None:
        """Shapes, dtype and finiteness at the valid positions; ValueError naming the tensor."""
        require_token_tensor(f"logp{what}", self.logp, response_mask)
        require_finite(f"advantages{what}", _per_token(self.advantages, response_mask),
                       response_mask)
        if self.token_hash.shape != response_mask.shape or self.token_hash.dtype != torch.int64:
            raise ValueError(f"token_hash{what} must be int64 of the response mask's shape "
                             f"{tuple(response_mask.shape)}; got {self.token_hash.dtype} of "
                             f"shape {tuple(self.token_hash.shape)}")


def _per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Advantages [B] or [B, T] as [B, T]."""
    if advantages.shape == response_mask.shape:
        return advantages
    if advantages.shape != response_mask.shape[:1]:
        raise ValueError(f"advantages must have shape [B] or [B, T] = "
                         f"{tuple(response_mask.shape)}; got {tuple(advantages.shape)}")
    return advantages[:, None].expand(response_mask.shape)


@dataclass(frozen=True)
class CovarianceStats:
    """Step constants of the covariance methods (module docstring).

    ``budget``: k = max(1, floor(ratio N)). ``clip_hash``: Clip-Cov's draw, the k-th largest hash
    among the tokens in the band at step start (all of them when fewer than k; None when none).
    ``kl_key``: KL-Cov's k-th largest (covariance, hash) key (None on a step without tokens).
    ``band_tokens``: Clip-Cov's tokens in the band at step start.
    """

    mean_logp: float
    mean_advantage: float
    budget: int
    clip_hash: int | None = None
    kl_key: int | None = None
    band_tokens: int = 0


def token_covariance(logp: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                     stats: CovarianceStats) -> torch.Tensor:
    """[B, T] float64 cov_t = (A_t - mean A)(logp_t - mean logp); 0 outside the mask."""
    adv = _per_token(advantages, response_mask)
    cov = (adv.detach().double() - stats.mean_advantage) * (logp.detach().double() - stats.mean_logp)
    return torch.where(response_mask, cov, torch.zeros((), dtype=cov.dtype, device=cov.device))


def _kl_keys(cov: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (cov rounded to float32, hash): KL-Cov's rank with ties broken."""
    return (order_keys(cov.float()) << 32) | hashes


def _grid_sums(values: torch.Tensor) -> list[float]:
    """[sum of round(v 2^24), sum of the remainders round((v 2^24 - high) 2^29), sum of |high|]
    of 1-D ``values``: the first two exact integers (summed in int64), the last a size check."""
    scaled = values.double() * 2.0 ** _HIGH_BITS
    high = torch.round(scaled)
    low = torch.round((scaled - high) * 2.0 ** _LOW_BITS)  # scaled - high is exact
    return [int(high.to(torch.int64).sum()), int(low.to(torch.int64).sum()), float(high.abs().sum())]


def covariance_stats(
    micro_batches: Sequence[tuple[CovarianceTokens, torch.Tensor]],
    selection: SelectionConfig,
    num_tokens: int,
    group=None,
) -> CovarianceStats:
    """The step constants from this rank's (old-policy ``CovarianceTokens``, response mask) pairs.

    ``num_tokens`` is the step's valid-token count over all ranks. Every rank must call this
    with the same selection; costs 2 all-reduces for the means, then Clip-Cov 1 + 32 and KL-Cov
    64 all-reduces of one count (the bisections of ``kth_largest_key``).
    """
    # control tensors on the CPU whatever the inputs' device (distributed.py's device rule)
    exact = torch.zeros(4, dtype=torch.int64)
    sizes = torch.zeros(2, dtype=torch.float64)
    for tokens, mask in micro_batches:
        for i, values in enumerate((tokens.logp, _per_token(tokens.advantages, mask))):
            high, low, size = _grid_sums(values.detach()[mask])
            exact[2 * i] += high
            exact[2 * i + 1] += low
            sizes[i] += size
    sizes = all_reduce_(sizes, group)
    if bool((sizes >= _SUM_LIMIT).any()):  # the same on every rank: all raise together
        raise ValueError("log-probs or advantages too large for the covariance's exact mean "
                         "(the sum of their magnitudes over the step must stay below 2^38)")
    high_l, low_l, high_a, low_a = all_reduce_(exact, group).tolist()
    n = int(num_tokens)
    if n == 0:
        return CovarianceStats(0.0, 0.0, 0)
    # Python's int / int is correctly rounded: one rounding of the exact mean of the grid values
    scale = n << (_HIGH_BITS + _LOW_BITS)
    mean_logp = ((high_l << _LOW_BITS) + low_l) / scale
    mean_advantage = ((high_a << _LOW_BITS) + low_a) / scale
    stats = CovarianceStats(mean_logp, mean_advantage, 0)
    covs = [(token_covariance(t.logp, t.advantages, mask, stats), t.token_hash, mask)
            for t, mask in micro_batches]
    if selection.method == "kl_cov":
        budget = floor_count(selection.kl_cov.ratio, n)
        keys = [_kl_keys(cov[mask], hashes[mask]) for cov, hashes, mask in covs]
        (kl_key,) = kth_largest_key(keys, [budget], _INT64_MIN, _INT64_MAX, group)
        return CovarianceStats(mean_logp, mean_advantage, budget, kl_key=kl_key)
    clip = selection.clip_cov
    budget = floor_count(clip.ratio, n)
    in_band = [hashes[mask & (cov >= clip.lb) & (cov <= clip.ub)] for cov, hashes, mask in covs]
    band = int(all_reduce_(torch.tensor([sum(h.numel() for h in in_band)], dtype=torch.int64),
                           group))
    drawn = min(budget, band)
    clip_hash = kth_largest_key(in_band, [drawn], 0, _MASK32, group)[0] if drawn else None
    return CovarianceStats(mean_logp, mean_advantage, budget, clip_hash=clip_hash,
                           band_tokens=band)


def covariance_selection(tokens: CovarianceTokens, response_mask: torch.Tensor,
                         selection: SelectionConfig, stats: CovarianceStats) -> torch.Tensor:
    """Bool [B, T]: the tokens Clip-Cov takes out of the policy gradient (in the band and drawn:
    hash >= ``clip_hash``), or KL-Cov penalises ((cov, hash) key >= ``kl_key``)."""
    cov = token_covariance(tokens.logp, tokens.advantages, response_mask, stats)
    if selection.method == "kl_cov":
        if stats.kl_key is None:
            return torch.zeros_like(response_mask)
        return response_mask & (_kl_keys(cov, tokens.token_hash) >= stats.kl_key)
    if stats.clip_hash is None:
        return torch.zeros_like(response_mask)
    clip = selection.clip_cov
    return response_mask & (cov >= clip.lb) & (cov <= clip.ub) & (tokens.token_hash >= stats.clip_hash)
