"""Token selection (docs/numerics.md §4, 5) against direct re-derivations, with ties and degenerate responses."""

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
    select_tokens,
    selection_entropy,
)

LOSS = LossConfig(clip=Constraints(0.2, 0.28, 0.003))
ARCHER = ArcherConfig(quantile=0.8, reasoning=Constraints(0.5, 0.6, 0.0),
                      knowledge=Constraints(0.2, 0.25, 0.001), soft_width=0.3)


def _batch(seed=0, ties=True):
    """[6, 12] float64 entropies (float32-representable) with ties, a 1-token and an empty response."""
    gen = torch.Generator().manual_seed(seed)
    entropy = torch.rand(6, 12, generator=gen).double()
    if ties:
        entropy[0, :6] = 0.5  # ties across the forking cut
        entropy[2, :] = 0.0  # all tied (the "H < 0.01" bulk)
    lengths = torch.tensor([12, 1, 8, 0, 10, 5])
    mask = torch.arange(12)[None, :] < lengths[:, None]
    entropy[~mask] = 99.0  # padding must never be selected
    return entropy, mask


def _fork(**kw):
    return SelectionConfig("forking", forking=ForkingConfig(**kw))


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("keep", ["top", "bottom"])
def test_global_forking_selects_h_at_or_above_the_kth_largest(rho, keep):
    entropy, mask = _batch()
    cfg = _fork(rho=rho, scope="global", keep=keep)
    ctx = build_step_context([(entropy, mask)], cfg)
    sel = select_tokens(entropy, mask, cfg, LOSS, ctx.forking_threshold)
    valid = entropy[mask].numpy()
    k = math.ceil(rho * valid.size - 1e-9)
    tau = np.sort(valid)[::-1][k - 1]
    top = mask & (entropy >= tau)
    assert ctx.forking_threshold == tau
    want = top if keep == "top" else mask & ~top
    assert torch.equal(sel.pg_weight.bool(), want)
    assert torch.equal(sel.token_class, torch.where(mask, top.long(), -1))
    assert ctx.num_selected == want.sum().item()
    assert top.sum() >= k  # ties at tau are all kept


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 1.0])
def test_micro_batch_forking_is_topk_with_k_ceil_rho_n(rho):
    entropy, mask = _batch()
    cfg = _fork(rho=rho, scope="micro_batch")
    sel = select_tokens(entropy, mask, cfg, LOSS)
    valid = entropy[mask].numpy()
    k = math.ceil(rho * valid.size - 1e-9)
    chosen = np.argsort(-valid, kind="stable")[:k]  # ties: earlier position first
    want = np.zeros(valid.size, dtype=bool)
    want[chosen] = True
    assert sel.pg_weight[mask].bool().numpy().tolist() == want.tolist()
    assert sel.pg_weight.sum().item() == k
    bottom = select_tokens(entropy, mask, _fork(rho=rho, scope="micro_batch", keep="bottom"), LOSS)
    assert torch.equal(bottom.pg_weight.bool(), mask & ~sel.pg_weight.bool())


def test_forking_and_none_use_the_uniform_constraints():
    entropy, mask = _batch()
    for cfg in (SelectionConfig("none"), _fork(scope="micro_batch")):
        sel = select_tokens(entropy, mask, cfg, LOSS)
        assert torch.all(sel.eps_low[mask] == 0.2) and torch.all(sel.eps_high[mask] == 0.28)
        assert torch.all(sel.kl_coef[mask] == 0.003) and sel.class_kl_coef == (0.003, 0.003)
    none = select_tokens(None, mask, SelectionConfig("none"), LOSS)
    assert torch.equal(none.pg_weight.bool(), mask) and torch.all(none.token_class[mask] == 0)


def test_archer_splits_each_response_at_its_linear_quantile():
    entropy, mask = _batch()
    sel = select_tokens(entropy, mask, SelectionConfig("archer", archer=ARCHER), LOSS)
    for i in range(entropy.shape[0]):
        valid = entropy[i][mask[i]].numpy()
        high = valid > np.quantile(valid, 0.8) if valid.size else np.zeros(0, dtype=bool)
        assert sel.token_class[i][mask[i]].numpy().tolist() == high.astype(int).tolist()
        got_eps_low = sel.eps_low[i][mask[i]].numpy()
        assert got_eps_low.tolist() == np.where(high, 0.5, 0.2).tolist()
        assert sel.eps_high[i][mask[i]].numpy().tolist() == np.where(high, 0.6, 0.25).tolist()
        assert sel.kl_coef[i][mask[i]].numpy().tolist() == np.where(high, 0.0, 0.001).tolist()
    assert torch.equal(sel.pg_weight.bool(), mask)  # all tokens updated synchronously
    assert sel.token_class[1, 0] == 0  # one token: never above its own quantile
    assert torch.all(sel.token_class[2][mask[2]] == 0)  # all tied: all knowledge
    assert sel.class_kl_coef == (0.001, 0.0)


def test_archer_soft_interpolates_constraints_by_entropy_rank():
    entropy, mask = _batch(ties=False)
    sel = select_tokens(entropy, mask, SelectionConfig("archer_soft", archer=ARCHER), LOSS)
    for i in range(entropy.shape[0]):
        valid = entropy[i][mask[i]].tolist()
        n = len(valid)
        for t, h in enumerate(valid):
            rank = (sum(x < h for x in valid) + (sum(x == h for x in valid) - 1) / 2) / max(n - 1, 1)
            w = min(1.0, max(0.0, (rank - 0.8) / 0.3 + 0.5))
            assert sel.high_share[i, t].item() == pytest.approx(w, abs=1e-12)
            assert sel.eps_low[i, t].item() == pytest.approx(0.2 + w * 0.3, abs=1e-12)
            assert sel.eps_high[i, t].item() == pytest.approx(0.25 + w * 0.35, abs=1e-12)
            assert sel.kl_coef[i, t].item() == pytest.approx(0.001 * (1 - w), abs=1e-15)
    assert torch.equal(sel.pg_weight.bool(), mask)


def test_archer_with_tiny_soft_width_recovers_the_hard_split_without_ties():
    entropy, mask = _batch(ties=False)
    mask[:, 5:] = False  # n - 1 = 4, so quantile 0.8 sits exactly on a rank: avoid that row length
    mask[:, :5] = True
    mask[1, 1:] = False
    soft = SelectionConfig("archer_soft", archer=ArcherConfig(quantile=0.7, soft_width=1e-6))
    hard = SelectionConfig("archer", archer=ArcherConfig(quantile=0.7))
    assert torch.equal(select_tokens(entropy, mask, soft, LOSS).token_class,
                       select_tokens(entropy, mask, hard, LOSS).token_class)


def test_fully_masked_micro_batch_selects_nothing():
    entropy, mask = _batch()
    mask[:] = False
    for cfg in (_fork(scope="micro_batch"), SelectionConfig("archer"), SelectionConfig("archer_soft")):
        sel = select_tokens(entropy, mask, cfg, LOSS)
        assert sel.pg_weight.sum() == 0 and torch.all(sel.token_class == -1)
    ctx = build_step_context([(entropy, mask)], _fork(scope="global"))
    assert ctx.num_tokens == 0 and ctx.forking_threshold == math.inf


def test_bad_inputs_raise():
    entropy, mask = _batch()
    entropy[0, 3] = float("nan")
    with pytest.raises(ValueError, match="entropy has 1 non-finite"):
        select_tokens(entropy, mask, SelectionConfig("archer"), LOSS)
    entropy[0, 3] = 0.1
    entropy[3, 0] = float("inf")  # padding: ignored
    select_tokens(entropy, mask, SelectionConfig("archer"), LOSS)
    with pytest.raises(ValueError, match="forking_threshold"):
        select_tokens(entropy, mask, _fork(scope="global"), LOSS)
    with pytest.raises(ValueError, match="response_mask must be a bool"):
        select_tokens(entropy, mask.long(), SelectionConfig("archer"), LOSS)
    with pytest.raises(ValueError, match="entropy is required"):
        select_tokens(None, mask, SelectionConfig("archer"), LOSS)


def test_selection_entropy_follows_entropy_source():
    current = torch.rand(2, 3, requires_grad=True)
    old = torch.rand(2, 3)
    chosen = selection_entropy(SelectionConfig("archer", entropy_source="current"), current, old)
    assert torch.equal(chosen, current.detach()) and not chosen.requires_grad
    assert torch.equal(selection_entropy(SelectionConfig("archer", entropy_source="old"), current, old), old)
    assert selection_entropy(SelectionConfig("none", entropy_source="old"), current, None) is None
    with pytest.raises(ValueError, match="entropy_source 'old' needs the old policy's entropy"):
        selection_entropy(SelectionConfig("forking", entropy_source="old"), current, None)
