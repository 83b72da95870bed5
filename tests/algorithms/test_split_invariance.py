"""Split invariance with real gloo processes (docs/numerics.md §3): one rank with one micro-batch and 2 ranks x 3
micro-batches of unequal sizes and lengths give the same step loss, the same gradient with respect
to every token's log-prob, and the same metrics, for every aggregation and selection method
(Clip-Cov and KL-Cov, docs/numerics.md §10, included: the same step constants bit for bit)."""

import math

import torch
import torch.distributed as dist

from megatron_archer.algorithms import (
    AlgorithmConfig,
    ArcherConfig,
    ClipCovConfig,
    Constraints,
    CovarianceTokens,
    ForkingConfig,
    KLCovConfig,
    LossConfig,
    SelectionConfig,
    build_step_context,
    entropy_summary,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
    token_hash,
)
from megatron_archer.algorithms.config import COVARIANCE_METHODS, RolloutCorrectionConfig
from megatron_archer.algorithms.rollout_correction import (
    correction_metric_sums,
    loss_tokens,
    rollout_correction,
    rollout_correction_summary,
)
from tests.distributed import run_distributed

WORLD_SIZE = 2
# responses per micro-batch, rank by rank: unequal sizes (and so unequal padded lengths)
SPLIT = [[3, 5, 2], [4, 1, 5]]
NUM_RESPONSES = sum(map(sum, SPLIT))
MAX_LEN = 13

SELECTIONS = {
    "none": SelectionConfig("none"),
    "forking_global_all": SelectionConfig("forking", forking=ForkingConfig(rho=0.2)),
    "forking_global_selected": SelectionConfig("forking", forking=ForkingConfig(rho=0.2, normalizer="selected")),
    "forking_global_bottom": SelectionConfig("forking", forking=ForkingConfig(rho=0.3, keep="bottom")),
    "archer": SelectionConfig("archer"),
    "archer_soft": SelectionConfig("archer_soft", archer=ArcherConfig(
        reasoning=Constraints(0.4, 0.5, 0.0), knowledge=Constraints(0.2, 0.2, 0.002))),
    # docs/numerics.md §10: the band holds more tokens than the budget, so the draw decides
    "clip_cov": SelectionConfig("clip_cov", clip_cov=ClipCovConfig(ratio=0.05, lb=0.2, ub=2.0)),
    "clip_cov_paper": SelectionConfig("clip_cov"),
    "kl_cov": SelectionConfig("kl_cov", kl_cov=KLCovConfig(ratio=0.1, coef=0.5)),
}
SALTS = (3, 1)  # seed, update: the covariance methods' draw
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
CORRECTIONS = [RolloutCorrectionConfig(True, "token", "truncate", 2.0),
               RolloutCorrectionConfig(True, "token", "mask", 1.5),
               RolloutCorrectionConfig(True, "sequence", "mask", 1.3, "geometric_mean"),
               RolloutCorrectionConfig(True, "sequence", "truncate", 2.0, "product"),
               RolloutCorrectionConfig(True, "token", "mask", 1.5, mask_normalizer="drop"),
               RolloutCorrectionConfig(True, "sequence", "mask", 1.3, mask_normalizer="drop")]


def _responses(seed):
    """The whole step as a list of per-response float64 tensors, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, MAX_LEN + 1, (NUM_RESPONSES,), generator=gen).tolist()
    lengths[0], lengths[7], lengths[15] = 1, 0, MAX_LEN
    out = []
    for length in lengths:
        logp = -3 * torch.rand(length, generator=gen, dtype=torch.float64)
        entropy = torch.rand(length, generator=gen)
        entropy[torch.rand(length, generator=gen) < 0.3] = 0.5  # ties across ranks and micro-batches
        entropy[torch.rand(length, generator=gen) < 0.2] = 0.0
        out.append(dict(
            logp=logp,
            old=logp + 0.4 * torch.randn(length, generator=gen, dtype=torch.float64),
            ref=logp + 0.3 * torch.randn(length, generator=gen, dtype=torch.float64),
            rollout=logp + 0.5 * torch.randn(length, generator=gen, dtype=torch.float64),
            entropy=entropy.double(),
            adv=torch.randn((), generator=gen, dtype=torch.float64),
            id=torch.tensor(100 + 3 * len(out)),  # the response's id in the step
        ))
    return out


def _pad(responses):
    """One micro-batch: [B, T] tensors right-padded to its own longest response."""
    width = max([len(r["logp"]) for r in responses] + [1])
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    batch = {key: torch.full((len(responses), width), float("nan"), dtype=torch.float64)
             for key in ("logp", "old", "ref", "entropy", "rollout")}
    for i, r in enumerate(responses):
        n = len(r["logp"])
        mask[i, :n] = True
        for key in batch:
            batch[key][i, :n] = r[key]
    batch["mask"] = mask
    batch["adv"] = torch.stack([r["adv"] for r in responses])
    batch["hash"] = token_hash(SALTS, torch.stack([r["id"] for r in responses]), width)
    return batch


def _step(micro_batches, selection, loss_cfg, group, correction=AlgorithmConfig().rollout_correction):
    """Summed loss of this rank's micro-batches, per-response log-prob gradients, metric sums
    (with the mismatch correction's, and its step summary, when ``correction`` is enabled)."""
    # the tokens in the loss: all, or those the correction keeps (mask_normalizer "drop")
    masks = [loss_tokens(mb["old"], mb["rollout"], mb["mask"], correction) for mb in micro_batches]
    by_covariance = selection.method in COVARIANCE_METHODS  # step constants from the old logp
    ctx = build_step_context([(mb["entropy"], m) for mb, m in zip(micro_batches, masks)], selection, group,
                             covariance=[CovarianceTokens(mb["old"], mb["adv"], mb["hash"])
                                         for mb in micro_batches] if by_covariance else None)
    total, grads, sums = 0.0, [], []
    for mb, mask in zip(micro_batches, masks):
        current = CovarianceTokens(mb["logp"], mb["adv"], mb["hash"]) if by_covariance else None
        sel = select_tokens(mb["entropy"], mask, selection, loss_cfg, ctx.forking_threshold,
                            covariance=current, covariance_stats=ctx.covariance)
        logp = mb["logp"].clone().requires_grad_(True)
        weights = rollout_correction(mb["old"], mb["rollout"], mask, correction)
        out = policy_loss(logp, mb["old"], mb["adv"], mask, sel, ctx, loss_cfg,
                          ref_logp=mb["ref"], entropy=mb["entropy"],
                          rollout_weight=weights.weight if correction.enabled else None)
        (grad,) = torch.autograd.grad(out.loss, [logp])
        total += out.loss.item()
        grads += [g[m] for g, m in zip(grad, mb["mask"])]
        sums.append(loss_metric_sums(out.terms, sel))
        if correction.enabled:
            sums[-1].update(correction_metric_sums(weights, sel))
    metrics = reduce_loss_metrics(sums, group)
    if correction.enabled:
        metrics.update(rollout_correction_summary(
            [(mb["old"], mb["rollout"], mb["mask"]) for mb in micro_batches], correction, group))
    return total, grads, metrics, ctx


def _close(a, b, what):
    assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), f"{what}: {a} != {b}"


def _worker(rank, world_size, seed):
    group = dist.group.WORLD
    responses = _responses(seed)
    single = [_pad(responses)]
    start = sum(map(sum, SPLIT[:rank]))
    mine = []
    for size in SPLIT[rank]:
        mine.append(_pad(responses[start:start + size]))
        start += size
    first = sum(map(sum, SPLIT[:rank]))

    cases = [(name, aggregation, kl_aggregation, None) for name in SELECTIONS
             for aggregation in AGGREGATIONS for kl_aggregation in ("token", "class_mean")]
    # the mismatch correction (docs/numerics.md §8) with every selection method, cycling the aggregations
    cases += [(name, AGGREGATIONS[(i + j) % 3], "class_mean" if "archer" in name else "token", correction)
              for i, name in enumerate(SELECTIONS) for j, correction in enumerate(CORRECTIONS)]
    for name, aggregation, kl_aggregation, correction in cases:
        selection = SELECTIONS[name]
        what = f"{name} / {aggregation} / {kl_aggregation} / {correction}"
        cfg = LossConfig(clip=Constraints(0.2, 0.28, 0.01), dual_clip=3.0,
                         kl_aggregation=kl_aggregation, entropy_coef=0.003,
                         aggregation=aggregation,
                         norm_length=MAX_LEN if aggregation == "seq-mean-token-sum-norm" else None)
        extra = () if correction is None else (correction,)
        want_loss, want_grads, want_metrics, want_ctx = _step(single, selection, cfg, None, *extra)
        loss, grads, metrics, ctx = _step(mine, selection, cfg, group, *extra)
        if correction is not None:  # both sides reached (dropped tokens: in the step summary)
            assert 0 < metrics["rollout_is/corrected_share"] < 1, what
        summed = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(summed, group=group)
        _close(summed.item(), want_loss, what)
        for i, grad in enumerate(grads):
            torch.testing.assert_close(grad, want_grads[first + i], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"{what}: {m}")
        assert metrics.keys() == want_metrics.keys(), what
        for key in metrics:
            _close(metrics[key], want_metrics[key], f"{what}: {key}")
        assert ctx.forking_threshold == want_ctx.forking_threshold, what
        assert ctx.covariance == want_ctx.covariance, what  # bit for bit
        assert ctx.num_selected == want_ctx.num_selected, what
        if selection.method in COVARIANCE_METHODS and name != "clip_cov_paper":
            assert 0 < metrics["high/token_share"] < 1, what  # the selection is reached
        assert ctx.loss_scale == 3 * WORLD_SIZE and want_ctx.loss_scale == 1

    entropies = [(mb["entropy"], mb["mask"]) for mb in mine]
    got = entropy_summary(entropies, group)
    want = entropy_summary([(single[0]["entropy"], single[0]["mask"])])
    assert got == want
    flat = torch.cat([r["entropy"] for r in responses]).sort().values
    n = flat.numel()
    assert want["entropy/p80"] == flat[math.ceil(0.8 * n) - 1].item()
    assert want["entropy/share_above_p80"] == (flat > want["entropy/p80"]).double().mean().item()


def _expect_error(fn, match):
    try:
        fn()
    except ValueError as error:
        assert match in str(error), str(error)
    else:
        raise AssertionError(f"no ValueError matching {match!r}")


def _bad_inputs_worker(rank, world_size):
    """Invalid inputs on one rank make every rank raise, instead of leaving the others hanging."""
    group = dist.group.WORLD
    batch = _pad(_responses(5)[:4])
    entropy = batch["entropy"].clone()
    if rank == 1:
        entropy[0, 0] = float("nan")
    fork = SELECTIONS["forking_global_all"]
    message = "entropy (micro-batch 1) has 1 non-finite" if rank == 1 else "another data-parallel rank"
    _expect_error(lambda: build_step_context([(batch["entropy"], batch["mask"]), (entropy, batch["mask"])],
                                             fork, group), message)
    micro_batches = [(batch["entropy"], batch["mask"])] * (rank + 1)
    _expect_error(lambda: build_step_context(micro_batches, fork, group), "disagree on the number")
    context = build_step_context([(batch["entropy"], batch["mask"])], fork, group)  # still in step
    assert context.loss_scale == world_size


def test_step_is_split_invariant_across_ranks_and_micro_batches():
    run_distributed(_worker, WORLD_SIZE, 1234)


def test_invalid_inputs_on_one_rank_raise_on_every_rank():
    run_distributed(_bad_inputs_worker, WORLD_SIZE)
