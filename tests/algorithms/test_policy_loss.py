"""Policy loss (docs/numerics.md §3 to 5) against the float64 re-derivation in reference.py, gradients included,
and the equivalences and authors'-code semantics the issue asks for."""

import math

import numpy as np
import pytest
import torch

from megatron_archer.algorithms import (
    ArcherConfig,
    Constraints,
    ForkingConfig,
    LossConfig,
    SelectionConfig,
    build_step_context,
    policy_loss,
    select_tokens,
)
from tests.algorithms.reference import policy_loss_reference

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def make_batch(seed, rows=7, width=11):
    """Fresh random float64 micro-batch with ratios inside and far outside the clip ranges."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=gen)
    lengths[0], lengths[1] = 1, 0  # a 1-token and a fully masked response
    mask = torch.arange(width)[None, :] < lengths[:, None]
    logp = -3 * torch.rand(rows, width, generator=gen, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(rows, width, generator=gen, dtype=torch.float64)
    old[2, 0], old[3, 0] = logp[2, 0] - 25, logp[3, 0] + 30  # beyond the log-ratio clamp
    ref = logp + torch.randn(rows, width, generator=gen, dtype=torch.float64)
    ref[4, 0] = logp[4, 0] + 25  # beyond the KL clamps
    entropy = torch.rand(rows, width, generator=gen).double()  # float32-representable
    adv = torch.randn(rows, generator=gen, dtype=torch.float64)
    adv[5] = 0.0
    for t in (logp, old, ref, entropy):
        t[~mask] = float("-inf")  # padding must be ignored
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, adv=adv, mask=mask)


SELECTIONS = {
    "none": SelectionConfig("none"),
    "forking_all": SelectionConfig("forking", forking=ForkingConfig(rho=0.3)),
    "forking_selected": SelectionConfig("forking", forking=ForkingConfig(rho=0.3, normalizer="selected")),
    "forking_bottom_mb": SelectionConfig("forking", forking=ForkingConfig(rho=0.3, scope="micro_batch",
                                                                          keep="bottom")),
    "archer": SelectionConfig("archer", archer=ArcherConfig(
        reasoning=Constraints(0.5, 0.6, 0.002), knowledge=Constraints(0.2, 0.25, 0.01))),
    "archer_soft": SelectionConfig("archer_soft"),
}


def run(batch, selection, loss_cfg, *, entropy_grad=False):
    """Loss, d loss / d logp, d loss / d entropy, selection and context for one micro-batch step."""
    ctx = build_step_context([(batch["entropy"], batch["mask"])], selection)
    sel = select_tokens(batch["entropy"], batch["mask"], selection, loss_cfg, ctx.forking_threshold)
    logp = batch["logp"].clone().requires_grad_(True)
    entropy = batch["entropy"].clone().requires_grad_(entropy_grad)
    out = policy_loss(logp, batch["old"], batch["adv"], batch["mask"], sel, ctx, loss_cfg,
                      ref_logp=batch["ref"], entropy=entropy)
    inputs = [logp, entropy] if entropy_grad else [logp]
    grads = torch.autograd.grad(out.loss, inputs)
    return out, grads, sel, ctx


def reference(batch, sel, ctx, cfg, pg_factor=None):
    np_ = lambda t: t.detach().numpy()  # noqa: E731
    return policy_loss_reference(
        logp=np_(batch["logp"]), old=np_(batch["old"]), adv=np_(batch["adv"]), mask=np_(batch["mask"]),
        pg_weight=np_(sel.pg_weight), eps_low=np_(sel.eps_low), eps_high=np_(sel.eps_high),
        kl_coef=np_(sel.kl_coef), high_share=np_(sel.high_share), class_kl_coef=sel.class_kl_coef,
        dual_clip=cfg.dual_clip, ref=np_(batch["ref"]), estimator=cfg.kl_estimator,
        kl_aggregation=cfg.kl_aggregation, entropy=np_(batch["entropy"]), entropy_coef=cfg.entropy_coef,
        aggregation=cfg.aggregation, n_tokens=ctx.num_tokens, n_seqs=ctx.num_sequences,
        n_selected=ctx.num_selected, by_selected=sel.normalize_by_selected,
        class_tokens=ctx.class_tokens, norm_length=cfg.norm_length,
        pg_factor=None if pg_factor is None else np_(pg_factor))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_aggregation", ["token", "class_mean"])
@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_loss_and_gradients_match_float64_reference(aggregation, estimator, kl_aggregation, selection):
    seed = hash((aggregation, estimator, kl_aggregation, selection)) % 2**31
    batch = make_batch(seed)
    cfg = LossConfig(clip=Constraints(0.2, 0.28, 0.05), dual_clip=3.0, kl_estimator=estimator,
                     kl_aggregation=kl_aggregation, entropy_coef=0.01, aggregation=aggregation,
                     norm_length=16 if aggregation == "seq-mean-token-sum-norm" else None)
    out, (dlogp, dentropy), sel, ctx = run(batch, SELECTIONS[selection], cfg, entropy_grad=True)
    want_loss, want_dlogp, want_dentropy = reference(batch, sel, ctx, cfg)
    assert out.loss.item() == pytest.approx(want_loss, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(dlogp.numpy(), want_dlogp, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dentropy.numpy(), want_dentropy, rtol=1e-10, atol=1e-14)
    assert torch.all(dlogp[~batch["mask"]] == 0)


def test_reference_covers_every_branch():
    """The random batches reach both clip sides, the dual clip and the clamps (else the test is weak)."""
    batch = make_batch(0)
    cfg = LossConfig(dual_clip=1.5, kl_estimator="k3")
    out, _, _, _ = run(batch, SELECTIONS["none"], cfg)
    terms = out.terms
    assert terms.clipped_low.any() and terms.clipped_high.any() and terms.dual_clipped.any()
    assert (terms.kl == 10).any()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_archer_with_equal_class_constraints_is_plain_clipped_pg(aggregation):
    batch = make_batch(11)
    same = Constraints(0.15, 0.3, 0.02)
    cfg = LossConfig(clip=same, dual_clip=4.0, aggregation=aggregation,
                     norm_length=16 if aggregation == "seq-mean-token-sum-norm" else None)
    plain, (g_plain,), _, _ = run(batch, SelectionConfig("none"), cfg)
    for method in ("archer", "archer_soft"):
        archer = SelectionConfig(method, archer=ArcherConfig(reasoning=same, knowledge=same))
        got, (g_got,), _, _ = run(batch, archer, cfg)
        assert got.loss.item() == pytest.approx(plain.loss.item(), rel=1e-14)
        torch.testing.assert_close(g_got, g_plain, rtol=1e-14, atol=0)


@pytest.mark.parametrize("scope", ["global", "micro_batch"])
@pytest.mark.parametrize("normalizer", ["all", "selected"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_forking_with_rho_one_is_dapo(scope, normalizer, aggregation):
    batch = make_batch(12)
    dapo = LossConfig(clip=Constraints(0.2, 0.28, 0.0), aggregation=aggregation)
    plain, (g_plain,), _, _ = run(batch, SelectionConfig("none"), dapo)
    fork = SelectionConfig("forking", forking=ForkingConfig(rho=1.0, scope=scope, normalizer=normalizer))
    got, (g_got,), _, _ = run(batch, fork, dapo)
    assert got.loss.item() == pytest.approx(plain.loss.item(), rel=1e-14)
    torch.testing.assert_close(g_got, g_plain, rtol=1e-14, atol=0)


def test_authors_forking_code_is_micro_batch_topk_mean_over_selected_tokens():
    batch = make_batch(13)
    rho = 0.2
    cfg = LossConfig(clip=Constraints(0.2, 0.28, 0.0))
    fork = SelectionConfig("forking", forking=ForkingConfig(rho=rho, scope="micro_batch",
                                                            normalizer="selected"))
    out, (grad,), _, _ = run(batch, fork, cfg)
    mask = batch["mask"]
    h = batch["entropy"][mask]
    k = math.ceil(rho * h.numel())
    top = torch.topk(h, k).indices  # the authors' selection (no ties in this batch)
    adv = batch["adv"][:, None].expand(mask.shape)[mask][top]
    r = torch.exp((batch["logp"] - batch["old"])[mask][top].clamp(-20, 20))
    per_token = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    assert out.loss.item() == pytest.approx(per_token.mean().item(), rel=1e-13)
    assert (grad[mask] != 0).sum() <= k


def test_authors_archer_code_averages_kl_within_each_class():
    batch = make_batch(14)
    archer = SelectionConfig("archer")  # reasoning: KL 0; knowledge: KL 0.001
    cfg = LossConfig(dual_clip=10.0, kl_estimator="k3", kl_aggregation="class_mean")
    with_kl, _, sel, _ = run(batch, archer, cfg)
    without = dict(batch)
    without_cfg = LossConfig(dual_clip=10.0)
    no_ref_sel = select_tokens(batch["entropy"], batch["mask"], SelectionConfig(
        "archer", archer=ArcherConfig(knowledge=Constraints(0.2, 0.2, 0.0))), without_cfg)
    ctx = build_step_context([(batch["entropy"], batch["mask"])], archer)
    pg_only = policy_loss(without["logp"], batch["old"], batch["adv"], batch["mask"], no_ref_sel, ctx,
                          without_cfg)
    mask = batch["mask"]
    d = (batch["ref"] - batch["logp"])[mask].clamp(-20, 20)
    k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
    low = sel.token_class[mask] == 0
    want = pg_only.loss.item() + 0.001 * k3[low].mean().item()
    assert with_kl.loss.item() == pytest.approx(want, rel=1e-13)


def test_all_equal_rewards_and_fully_masked_batches_give_finite_zero_gradients():
    batch = make_batch(15)
    batch["adv"] = torch.zeros_like(batch["adv"])
    batch["ref"] = batch["logp"].clone()  # k3 of a zero log-ratio is 0 with zero gradient
    cfg = LossConfig(kl_estimator="k3")
    for name, selection in SELECTIONS.items():
        out, (grad,), _, _ = run(batch, selection, cfg)
        assert out.loss.item() == 0.0 and torch.all(grad == 0), name
    batch = make_batch(16)
    batch["mask"][:] = False
    for name, selection in SELECTIONS.items():
        for aggregation in AGGREGATIONS:
            cfg = LossConfig(clip=Constraints(0.2, 0.2, 0.1), aggregation=aggregation,
                             kl_aggregation="class_mean" if name == "archer" else "token",
                             norm_length=8 if aggregation == "seq-mean-token-sum-norm" else None)
            out, (grad,), _, _ = run(batch, selection, cfg)
            assert out.loss.item() == 0.0 and torch.all(grad == 0), (name, aggregation)


def test_one_token_responses():
    batch = make_batch(17)
    batch["mask"][:, 1:] = False
    batch["mask"][1, 0] = False
    cfg = LossConfig(aggregation="seq-mean-token-mean")
    for selection in SELECTIONS.values():
        out, (grad,), sel, ctx = run(batch, selection, cfg)
        want, want_grad, _ = reference(batch, sel, ctx, cfg)
        assert out.loss.item() == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "advantages", "entropy"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_raise_naming_the_tensor(name, bad):
    batch = make_batch(18)
    cfg = LossConfig(clip=Constraints(0.2, 0.2, 0.1), entropy_coef=0.01)
    ctx = build_step_context([(batch["entropy"], batch["mask"])], SelectionConfig())
    sel = select_tokens(batch["entropy"], batch["mask"], SelectionConfig(), cfg)
    args = dict(logp=batch["logp"], old_logp=batch["old"], advantages=batch["adv"],
                ref_logp=batch["ref"], entropy=batch["entropy"])
    args[name] = args[name].clone()
    args[name][0] = bad
    with pytest.raises(ValueError, match=f"^{name} has"):
        policy_loss(args["logp"], args["old_logp"], args["advantages"], batch["mask"], sel, ctx, cfg,
                    ref_logp=args["ref_logp"], entropy=args["entropy"])


def test_missing_reference_or_entropy_raise():
    batch = make_batch(19)
    ctx = build_step_context([(batch["entropy"], batch["mask"])], SelectionConfig())
    cfg = LossConfig(clip=Constraints(0.2, 0.2, 0.1))
    sel = select_tokens(None, batch["mask"], SelectionConfig(), cfg)
    with pytest.raises(ValueError, match="ref_logp is required"):
        policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], sel, ctx, cfg)
    cfg = LossConfig(entropy_coef=0.1)
    sel = select_tokens(None, batch["mask"], SelectionConfig(), cfg)
    with pytest.raises(ValueError, match="entropy is required"):
        policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], sel, ctx, cfg)
    with pytest.raises(ValueError, match="advantages must have shape"):
        policy_loss(batch["logp"], batch["old"], batch["adv"][:3], batch["mask"], sel, ctx, LossConfig())


def test_clamps_keep_float32_finite_for_extreme_log_ratios():
    """|logp - old| and |logp_ref - logp| of 100 overflow exp in float32 without the clamps."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]], requires_grad=True)
    old = logp.detach() + torch.tensor([[100.0, -100.0, 0.0, 0.0]])
    ref = logp.detach() + torch.tensor([[0.0, 0.0, 100.0, -100.0]])
    adv = torch.tensor([-1.0])
    cfg = LossConfig(clip=Constraints(0.2, 0.2, 0.1), kl_estimator="k3")
    ctx = build_step_context([(None, mask)], SelectionConfig())
    sel = select_tokens(None, mask, SelectionConfig(), cfg)
    out = policy_loss(logp, old, adv, mask, sel, ctx, cfg, ref_logp=ref)
    (grad,) = torch.autograd.grad(out.loss, [logp])
    assert torch.isfinite(out.loss) and torch.all(torch.isfinite(grad))
    assert torch.all(out.terms.kl[0, 2:] == 10.0)
    assert grad[0, 0] == 0 and grad[0, 1] == 0  # clipped / clamped policy term: no gradient
    assert grad[0, 2] == 0.25 and grad[0, 3] == 0.25  # r = 1 policy term only: clamped KL adds nothing
