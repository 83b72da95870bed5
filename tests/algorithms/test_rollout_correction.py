"""Train-inference mismatch correction (docs/numerics.md §8): weights and masks against a direct float64
re-derivation, its place in the policy loss for every selection method, its metrics, and a
constructed off-policy batch where it removes the bias of the gradient estimate."""

import math

import numpy as np
import pytest
import torch

from megatron_archer.algorithms import (
    Constraints,
    LossConfig,
    SelectionConfig,
    build_step_context,
    select_tokens,
)
from megatron_archer.algorithms.config import AlgorithmConfig, RolloutCorrectionConfig, config_from_dict
from megatron_archer.algorithms.metrics import loss_metric_sums, reduce_loss_metrics
from megatron_archer.algorithms.policy_loss import policy_loss
from megatron_archer.algorithms.rollout_correction import (
    correction_metric_sums,
    loss_tokens,
    rollout_correction,
    rollout_correction_summary,
)
from tests.algorithms.test_policy_loss import SELECTIONS, make_batch, reference

CONFIGS = [RolloutCorrectionConfig(True, level, mode, threshold, ratio)
           for level, ratio in (("token", "geometric_mean"), ("sequence", "geometric_mean"),
                                ("sequence", "product"))
           for mode in ("truncate", "mask") for threshold in (1.5, 2.0)]


def rollout_batch(seed):
    """make_batch plus engine log-probs: small and large mismatches, beyond the clamp, ties at C."""
    batch = make_batch(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    old, mask = batch["old"], batch["mask"]
    rollout = old + 0.6 * torch.randn(old.shape, generator=gen, dtype=torch.float64)
    rollout[2, 0] = old[2, 0] + 30  # log w = -30: beyond the clamp
    rollout[3, 0] = old[3, 0] - 25
    rollout[4, 1] = old[4, 1] - math.log(2.0)  # w = 2 up to rounding
    rollout[~mask] = float("nan")  # padding must be ignored
    batch["rollout"] = rollout
    return batch


def direct(old, rollout, mask, cfg):
    """(weight, ratio, corrected) per token by explicit loops in float64."""
    rows, width = mask.shape
    weight, ratio, corrected = (np.zeros((rows, width)) for _ in range(3))
    for i in range(rows):
        valid = [t for t in range(width) if mask[i, t]]
        log_w = {t: min(max(old[i, t] - rollout[i, t], -20.0), 20.0) for t in valid}
        if cfg.level == "sequence" and valid:
            total = sum(log_w.values())
            seq = total / len(valid) if cfg.sequence_ratio == "geometric_mean" else min(max(total, -20.0), 20.0)
            log_w = {t: seq for t in valid}
        for t in valid:
            w = math.exp(log_w[t])
            ratio[i, t] = w
            if cfg.mode == "truncate":
                weight[i, t], corrected[i, t] = min(w, cfg.threshold), w > cfg.threshold
            else:
                outside = w < 1 / cfg.threshold or w > cfg.threshold
                weight[i, t], corrected[i, t] = 0.0 if outside else 1.0, outside
    return weight, ratio, corrected.astype(bool)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.level}-{c.sequence_ratio}-{c.mode}-{c.threshold}")
def test_weights_and_masks_match_direct_float64(cfg):
    for seed in (31, 32, 33):
        batch = rollout_batch(seed)
        got = rollout_correction(batch["old"], batch["rollout"], batch["mask"], cfg)
        want_w, want_r, want_c = direct(batch["old"].numpy(), batch["rollout"].numpy(),
                                        batch["mask"].numpy(), cfg)
        np.testing.assert_allclose(got.weight.numpy(), want_w, rtol=1e-13, atol=0)
        np.testing.assert_allclose(got.ratio.numpy(), want_r, rtol=1e-13, atol=0)
        np.testing.assert_array_equal(got.corrected.numpy(), want_c)
        assert got.corrected.any() and not got.corrected.all()  # the batches reach both sides


def test_float32_inputs_stay_finite_beyond_the_clamp():
    mask = torch.ones(1, 3, dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    rollout = old + torch.tensor([[100.0, -100.0, 0.0]])
    for cfg in CONFIGS:
        out = rollout_correction(old, rollout, mask, cfg)
        assert torch.isfinite(out.weight).all() and torch.isfinite(out.ratio).all()


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_multiplies_each_policy_term_by_the_weight(selection, aggregation):
    """Loss and gradient equal the float64 reference with the policy term times the correction
    weight: clip ranges, classes, KL and every normaliser (masked tokens stay in it) untouched."""
    batch = rollout_batch(34)
    cfg = LossConfig(dual_clip=3.0, kl_estimator="k3", entropy_coef=0.01, aggregation=aggregation,
                     kl_aggregation="class_mean" if selection.startswith("archer") else "token")
    sel_cfg = SELECTIONS[selection]
    ctx = build_step_context([(batch["entropy"], batch["mask"])], sel_cfg)
    sel = select_tokens(batch["entropy"], batch["mask"], sel_cfg, cfg, ctx.forking_threshold)
    for correction_cfg in (CONFIGS[0], CONFIGS[7]):
        correction = rollout_correction(batch["old"], batch["rollout"], batch["mask"], correction_cfg)
        logp = batch["logp"].clone().requires_grad_(True)
        out = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], sel, ctx, cfg,
                          ref_logp=batch["ref"], entropy=batch["entropy"],
                          rollout_weight=correction.weight)
        (grad,) = torch.autograd.grad(out.loss, [logp])
        want_loss, want_grad, _ = reference(batch, sel, ctx, cfg, pg_factor=correction.weight)
        assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dropped_tokens_leave_the_step_and_its_normalisers(level):
    """mask_normalizer "drop": the loss is the float64 reference on the kept tokens only, with
    the step context counted on them; for a pure token-mean policy loss it is the "keep" loss
    rescaled from N_all to N_kept tokens."""
    batch = rollout_batch(37)
    keep_cfg = RolloutCorrectionConfig(True, level, "mask", 1.5)
    drop_cfg = RolloutCorrectionConfig(True, level, "mask", 1.5, mask_normalizer="drop")
    kept = loss_tokens(batch["old"], batch["rollout"], batch["mask"], drop_cfg)
    corrected = rollout_correction(batch["old"], batch["rollout"], batch["mask"], keep_cfg).corrected
    assert torch.equal(kept, batch["mask"] & ~corrected) and corrected.any()
    assert torch.equal(loss_tokens(batch["old"], batch["rollout"], batch["mask"], keep_cfg), batch["mask"])
    cfg = LossConfig(dual_clip=3.0)
    for name in ("none", "forking_all", "archer"):
        sel_cfg = SELECTIONS[name]
        ctx = build_step_context([(batch["entropy"], kept)], sel_cfg)
        sel = select_tokens(batch["entropy"], kept, sel_cfg, cfg, ctx.forking_threshold)
        logp = batch["logp"].clone().requires_grad_(True)
        weight = rollout_correction(batch["old"], batch["rollout"], kept, drop_cfg).weight
        out = policy_loss(logp, batch["old"], batch["adv"], kept, sel, ctx, cfg,
                          ref_logp=batch["ref"], rollout_weight=weight)
        (grad,) = torch.autograd.grad(out.loss, [logp])
        want_loss, want_grad, _ = reference({**batch, "mask": kept}, sel, ctx, cfg)
        assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14), name
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)
    keep_ctx = build_step_context([(None, batch["mask"])], SelectionConfig())
    drop_ctx = build_step_context([(None, kept)], SelectionConfig())
    losses = []
    for ctx, mask, weights in ((keep_ctx, batch["mask"], keep_cfg), (drop_ctx, kept, drop_cfg)):
        sel = select_tokens(None, mask, SelectionConfig(), cfg)
        w = rollout_correction(batch["old"], batch["rollout"], mask, weights).weight
        losses.append(policy_loss(batch["logp"], batch["old"], batch["adv"], mask, sel, ctx, cfg,
                                  rollout_weight=w).loss.item())
    assert drop_ctx.num_tokens == batch["mask"].sum() - corrected.sum()
    assert losses[1] * drop_ctx.num_tokens == pytest.approx(losses[0] * keep_ctx.num_tokens, rel=1e-12)


def test_non_finite_correction_weight_raises_naming_it():
    batch = rollout_batch(35)
    ctx = build_step_context([(None, batch["mask"])], SelectionConfig())
    sel = select_tokens(None, batch["mask"], SelectionConfig(), LossConfig())
    weight = torch.ones_like(batch["logp"])
    weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^rollout_weight has 1 non-finite"):
        policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], sel, ctx, LossConfig(),
                    rollout_weight=weight)
    with pytest.raises(ValueError, match="^rollout_logp has"):
        rollout_correction(batch["old"], weight, batch["mask"], CONFIGS[0])


def test_metrics_per_class_and_step_summary_match_direct():
    batch = rollout_batch(36)
    mask = batch["mask"]
    selection = SelectionConfig("archer")
    cfg = CONFIGS[1]  # token level, truncate at 2
    sel = select_tokens(batch["entropy"], mask, selection, LossConfig())
    correction = rollout_correction(batch["old"], batch["rollout"], mask, cfg)
    ctx = build_step_context([(batch["entropy"], mask)], selection)
    out = policy_loss(batch["logp"], batch["old"], batch["adv"], mask, sel, ctx, LossConfig(),
                      ref_logp=batch["ref"], rollout_weight=correction.weight)
    sums = {**loss_metric_sums(out.terms, sel), **correction_metric_sums(correction, sel)}
    metrics = reduce_loss_metrics([{k: v / 2 for k, v in sums.items()}] * 2)  # two micro-batches

    _, ratio, corrected = direct(batch["old"].numpy(), batch["rollout"].numpy(), mask.numpy(), cfg)
    classes = sel.token_class.numpy()
    for scope, members in (("all", classes >= 0), ("low", classes == 0), ("high", classes == 1)):
        assert metrics[f"{scope}/rollout_is_mean"] == pytest.approx(ratio[members].mean(), rel=1e-12)
        assert metrics[f"{scope}/rollout_is_corrected_frac"] == pytest.approx(corrected[members].mean())

    halves = [(batch["old"][:4], batch["rollout"][:4], mask[:4]), (batch["old"][4:], batch["rollout"][4:], mask[4:])]
    summary = rollout_correction_summary(halves, cfg)
    values = np.sort(ratio[mask.numpy()].astype(np.float32))
    n = values.size
    assert summary["rollout_is/mean"] == pytest.approx(ratio[mask.numpy()].mean(), rel=1e-6)
    assert summary["rollout_is/max"] == values[-1]
    assert summary["rollout_is/p99"] == values[math.ceil(0.99 * n) - 1]
    assert summary["rollout_is/corrected_share"] == pytest.approx(corrected[mask.numpy()].mean())
    assert rollout_correction_summary([(batch["old"], batch["rollout"], torch.zeros_like(mask))], cfg) == {}


def _mean_gradient(correction_cfg, batches=120, size=32, seed=0):
    """Mean over sampled batches of d(step loss)/d(logits) for a position-wise categorical policy
    whose samples come from a perturbed engine distribution; and the exact on-policy gradient."""
    gen = torch.Generator().manual_seed(seed)
    positions, vocab = 6, 5
    logits = torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    engine_logits = logits + 0.7 * torch.randn(positions, vocab, generator=gen, dtype=torch.float64)
    reward = torch.tensor([2.0, -1.0, 0.5, -2.0, 1.0], dtype=torch.float64)
    pi, engine = logits.softmax(-1), engine_logits.softmax(-1)
    # loss = -(1 / N) sum_t A_t r_t over N = size * positions tokens: its expectation under pi has
    # gradient -(1 / positions) pi_t (f - E_pi f) per position
    on_policy = -(pi * (reward - (pi * reward).sum(-1, keepdim=True))) / positions
    # the uncorrected estimator's exact expectation: -(1 / positions) sum_y q(y) f(y) (e_y - pi)
    off_policy = -(engine * reward - (engine * reward).sum(-1, keepdim=True) * pi) / positions
    mask = torch.ones(size, positions, dtype=torch.bool)
    selection = SelectionConfig()
    cfg = LossConfig(clip=Constraints(0.2, 0.2, 0.0))
    ctx = build_step_context([(None, mask)], selection)
    sel = select_tokens(None, mask, selection, cfg)
    total = torch.zeros_like(logits)
    for _ in range(batches):
        tokens = torch.multinomial(engine, size, replacement=True, generator=gen).T  # [size, positions]
        theta = logits.clone().requires_grad_(True)
        logp = theta.log_softmax(-1).gather(1, tokens.T).T
        rollout_logp = engine_logits.log_softmax(-1).gather(1, tokens.T).T
        weight = None if correction_cfg is None else rollout_correction(
            logp.detach(), rollout_logp, mask, correction_cfg).weight
        out = policy_loss(logp, logp.detach(), reward[tokens], mask, sel, ctx, cfg, rollout_weight=weight)
        total += torch.autograd.grad(out.loss, [theta])[0]
    return total / batches, on_policy, off_policy


def test_truncated_importance_weights_remove_the_gradient_bias():
    """Measure: relative error ||mean sampled gradient - on-policy gradient|| / ||on-policy||
    over 120 batches of 32 responses x 6 tokens (fixed seed). Uncorrected, the estimate converges
    to the engine's gradient: error 0.26, the exact bias of that estimator being 0.26 too.
    Token-level weights with a cap that never binds are unbiased (0.023, the sampling noise);
    truncation at C = 2 leaves a small truncation bias (0.06)."""
    errors = {}
    for name, cfg in (("none", None),
                      ("unbounded", RolloutCorrectionConfig(True, "token", "truncate", 1e6)),
                      ("c2", RolloutCorrectionConfig(True, "token", "truncate", 2.0))):
        mean, on_policy, off_policy = _mean_gradient(cfg)
        errors[name] = ((mean - on_policy).norm() / on_policy.norm()).item()
    exact_bias = ((off_policy - on_policy).norm() / on_policy.norm()).item()
    assert exact_bias > 0.2, exact_bias  # the constructed mismatch is large
    assert abs(errors["none"] - exact_bias) < 0.05, (errors, exact_bias)
    assert errors["unbounded"] < 0.05, errors
    assert errors["c2"] < errors["none"] / 3, errors


def test_config_validation_names_the_field():
    cases = [
        ({"rollout_correction": {"level": "batch"}}, "rollout_correction.level must be one of token, sequence"),
        ({"rollout_correction": {"mode": "clip"}}, "rollout_correction.mode must be one of truncate, mask"),
        ({"rollout_correction": {"threshold": 1.0}}, "rollout_correction.threshold must be in (1.0, inf]"),
        ({"rollout_correction": {"sequence_ratio": "sum"}},
         "rollout_correction.sequence_ratio must be one of geometric_mean, product"),
        ({"rollout_correction": {"enabled": 1}}, "rollout_correction.enabled must be true or false"),
        ({"old_logprobs": "engine"}, "old_logprobs must be one of recompute, rollout"),
        ({"rollout_correction": {"mask_normalizer": "none"}},
         "rollout_correction.mask_normalizer must be one of keep, drop"),
        ({"rollout_correction": {"mask_normalizer": "drop"}},
         "rollout_correction.mask_normalizer 'drop' needs mode 'mask'"),
        ({"old_logprobs": "rollout", "rollout_correction": {"enabled": True}},
         "rollout_correction.enabled has no effect with old_logprobs 'rollout'"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError) as error:
            config_from_dict(data)
        assert message in str(error.value), (data, str(error.value))
    cfg = config_from_dict({"preset": "archer", "rollout_correction": {"enabled": True}})
    assert cfg.rollout_correction == RolloutCorrectionConfig(True, "token", "truncate", 2.0)
    assert AlgorithmConfig().rollout_correction.enabled is False and AlgorithmConfig().old_logprobs == "recompute"
