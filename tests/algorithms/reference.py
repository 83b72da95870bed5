"""Direct float64 numpy re-derivation of the policy loss and its gradients (docs/numerics.md §3), written
independently of megatron_archer so that the tests can fail."""

from __future__ import annotations

import numpy as np


def kl_and_grad(logp, ref, estimator):
    """Per-token KL estimate and its derivative with respect to logp."""
    d = ref - logp
    if estimator == "k1":
        return -d, np.ones_like(d)
    if estimator == "k2":
        return d * d / 2, -d
    inside = np.abs(d) < 20
    dc = np.clip(d, -20, 20)
    k3 = np.exp(dc) - dc - 1
    grad = np.where(inside, -(np.exp(dc) - 1), 0.0)
    return np.clip(k3, -10, 10), np.where(k3 > 10, 0.0, grad)


def policy_loss_reference(*, logp, old, adv, mask, pg_weight, eps_low, eps_high, kl_coef, high_share,
                          class_kl_coef, dual_clip, ref, estimator, kl_aggregation, entropy,
                          entropy_coef, aggregation, n_tokens, n_seqs, n_selected, by_selected,
                          class_tokens, norm_length, pg_factor=None, abs_kl_coef=None):
    """Loss and (d loss / d logp, d loss / d entropy) for one micro-batch of a step.

    ``pg_factor``: the mismatch correction's per-token factor on the policy term (docs/numerics.md §8); it
    leaves every normaliser as it is. ``abs_kl_coef``: KL-Cov's per-token coefficient of
    |logp - old| (docs/numerics.md §10), a regulariser like the KL."""
    m = mask.astype(np.float64)
    adv = np.broadcast_to(adv[:, None], mask.shape) if adv.ndim == 1 else adv
    adv = np.where(mask, adv, 0.0)
    x = np.where(mask, logp, 0.0) - np.where(mask, old, 0.0)
    r = np.exp(np.clip(x, -20, 20))
    dr = np.where(np.abs(x) < 20, r, 0.0)
    unclipped = -adv * r
    clipped = -adv * np.clip(r, 1 - eps_low, 1 + eps_high)
    pg = np.maximum(unclipped, clipped)
    dpg = np.where(unclipped >= clipped, -adv * dr, 0.0)
    if dual_clip is not None:
        capped = (adv < 0) & (pg > -adv * dual_clip)
        pg = np.where(capped, -adv * dual_clip, pg)
        dpg = np.where(capped, 0.0, dpg)
    pg, dpg = pg * pg_weight * m, dpg * pg_weight * m
    if pg_factor is not None:
        pg, dpg = pg * pg_factor, dpg * pg_factor

    reg = np.zeros_like(pg)
    dreg = np.zeros_like(pg)
    dent = np.zeros_like(pg)
    kl_class_loss, dkl_class = 0.0, np.zeros_like(pg)
    if ref is not None:
        kl, dkl = kl_and_grad(np.where(mask, logp, 0.0), np.where(mask, ref, 0.0), estimator)
        kl, dkl = kl * m, dkl * m
        if kl_aggregation == "token":
            reg, dreg = kl_coef * kl, kl_coef * dkl
        else:
            for coef, share, count in ((class_kl_coef[0], 1 - high_share, class_tokens[0]),
                                       (class_kl_coef[1], high_share, class_tokens[1])):
                if count > 0:
                    kl_class_loss += coef * np.sum(share * kl) / count
                    dkl_class += coef * share * dkl / count
    if abs_kl_coef is not None:
        reg = reg + abs_kl_coef * np.abs(x) * m
        dreg = dreg + abs_kl_coef * np.sign(x) * m
    if entropy_coef:
        reg = reg - entropy_coef * np.where(mask, entropy, 0.0)
        dent = -entropy_coef * m

    seq_tokens = m.sum(axis=1)
    if aggregation == "token-mean":
        pg_scale = np.full(mask.shape, 1 / (n_selected if by_selected else n_tokens))
        reg_scale = np.full(mask.shape, 1 / n_tokens)
    elif aggregation == "seq-mean-token-mean":
        pg_den = (pg_weight * m).sum(axis=1) if by_selected else seq_tokens
        pg_scale = np.broadcast_to((1 / np.where(pg_den > 0, pg_den, 1) / n_seqs)[:, None], mask.shape)
        reg_scale = np.broadcast_to((1 / np.where(seq_tokens > 0, seq_tokens, 1) / n_seqs)[:, None], mask.shape)
    else:
        pg_scale = reg_scale = np.full(mask.shape, 1 / (n_seqs * norm_length))
    loss = np.sum(pg * pg_scale) + np.sum(reg * reg_scale) + kl_class_loss
    return loss, dpg * pg_scale + dreg * reg_scale + dkl_class, dent * reg_scale
