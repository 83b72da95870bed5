"""Loss and entropy metrics (docs/numerics.md §7) against direct re-derivations on one process."""

import math

import numpy as np
import pytest
import torch

from megatron_archer.algorithms import (
    LossConfig,
    SelectionConfig,
    build_step_context,
    entropy_summary,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
)
from tests.algorithms.test_policy_loss import make_batch


def test_loss_metrics_per_class_match_direct_counts():
    batch = make_batch(21)
    selection = SelectionConfig("archer")
    cfg = LossConfig(dual_clip=2.0, kl_aggregation="class_mean")
    ctx = build_step_context([(batch["entropy"], batch["mask"])], selection)
    sel = select_tokens(batch["entropy"], batch["mask"], selection, cfg)
    out = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], sel, ctx, cfg,
                      ref_logp=batch["ref"])
    halves = [{k: v / 2 for k, v in loss_metric_sums(out.terms, sel).items()}] * 2  # two micro-batches
    metrics = reduce_loss_metrics(halves)

    mask = batch["mask"]
    adv = batch["adv"][:, None].expand(mask.shape)[mask].numpy()
    r = np.exp(np.clip((batch["logp"] - batch["old"])[mask].numpy(), -20, 20))
    d = np.clip((batch["ref"] - batch["logp"])[mask].numpy(), -20, 20)
    kl = np.clip(np.exp(d) - d - 1, -10, 10)
    h = batch["entropy"].numpy()
    high = np.concatenate([row[m] > np.quantile(row[m], 0.8) for row, m in zip(h, mask.numpy()) if m.any()])
    eps = np.where(high, 0.5, 0.2)
    for scope, members in (("all", np.ones_like(high)), ("low", ~high), ("high", high)):
        n = members.sum()
        assert metrics[f"{scope}/token_share"] == pytest.approx(n / high.size)
        assert metrics[f"{scope}/clip_frac_low"] == pytest.approx(np.sum(members & (adv < 0) & (r < 1 - eps)) / n)
        assert metrics[f"{scope}/clip_frac_high"] == pytest.approx(np.sum(members & (adv > 0) & (r > 1 + eps)) / n)
        assert metrics[f"{scope}/dual_clip_frac"] == pytest.approx(np.sum(members & (adv < 0) & (r > 2.0)) / n)
        assert metrics[f"{scope}/ratio_mean"] == pytest.approx(r[members].mean())
        assert metrics[f"{scope}/kl_mean"] == pytest.approx(kl[members].mean())
    assert metrics["all/clip_frac_low"] > 0 and metrics["all/clip_frac_high"] > 0


def test_empty_class_reports_only_its_share():
    batch = make_batch(22)
    cfg = LossConfig()
    ctx = build_step_context([(None, batch["mask"])], SelectionConfig())
    sel = select_tokens(None, batch["mask"], SelectionConfig(), cfg)
    out = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], sel, ctx, cfg)
    metrics = reduce_loss_metrics([loss_metric_sums(out.terms, sel)])
    assert metrics["high/token_share"] == 0.0 and "high/ratio_mean" not in metrics
    assert metrics["low/token_share"] == 1.0 and "all/kl_mean" not in metrics


def test_entropy_summary_nearest_rank_percentiles():
    gen = torch.Generator().manual_seed(23)
    entropy = torch.rand(5, 40, generator=gen) ** 4  # a low-entropy bulk, as in the papers
    entropy[:, :10] = 0.001
    mask = torch.rand(5, 40, generator=gen) < 0.8
    summary = entropy_summary([(entropy[:2], mask[:2]), (entropy[2:], mask[2:])],
                              percentiles=(0.2, 0.5, 0.8, 0.99, 1.0))
    values = np.sort(entropy[mask].numpy())
    n = values.size
    for p in (0.2, 0.5, 0.8, 0.99, 1.0):
        assert summary[f"entropy/p{100 * p:g}"] == values[math.ceil(p * n) - 1]
    assert summary["entropy/mean"] == pytest.approx(values.astype(np.float64).mean())
    assert summary["entropy/share_below_0.01"] == pytest.approx(np.mean(values < 0.01))
    assert summary["entropy/share_above_p80"] == pytest.approx(np.mean(values > summary["entropy/p80"]))
    assert entropy_summary([(entropy, torch.zeros_like(mask))]) == {}
    with pytest.raises(ValueError, match="percentiles"):
        entropy_summary([(entropy, mask)], percentiles=(0.0,))
