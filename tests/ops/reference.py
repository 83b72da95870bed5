"""Float64 full-vocabulary reference for log-prob and entropy (docs/numerics.md §1), written independently."""

from __future__ import annotations

import torch


def reference_logprobs_entropy(logits, labels, *, temperature=1.0, vocab_size=None):
    """(logp, entropy) in float64 from full (unsharded) logits, padding columns dropped.

    Differentiable w.r.t. ``logits`` (when it requires grad) through plain autograd.
    """
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    x = logits[..., :vocab_size].double() / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    p = logp_all.exp()
    # 0 * log 0 = 0 for -inf logits; mask before multiplying so no 0 * inf reaches autograd.
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(p))).sum(-1)
    logp = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return logp, entropy


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||a - e|| / ||e|| in float64 (0 when both are 0)."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff if denom == 0 else diff / denom
