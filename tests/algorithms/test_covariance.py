"""Clip-Cov and KL-Cov (docs/numerics.md §10) against a float64 numpy re-derivation written from the
paper's definitions (Cui et al. 2025, §4: centred covariance of log-prob and advantage over the
step's tokens; Clip-Cov drops a random max(1, floor(r N)) of the tokens whose covariance lies in
[lb, ub] from the policy gradient, KL-Cov adds coef |logp - logp_old| to the top max(1, floor(k N))
by covariance), on fresh random steps split into micro-batches, with the nasty cases: all-equal
advantages, empty responses, a single token, a step without tokens."""

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from megatron_archer.algorithms import (
    AlgorithmConfig,
    ClipCovConfig,
    Constraints,
    CovarianceTokens,
    KLCovConfig,
    LossConfig,
    SelectionConfig,
    build_step_context,
    config_from_dict,
    content_ids,
    loss_metric_sums,
    policy_loss,
    reduce_loss_metrics,
    select_tokens,
    token_hash,
)
from megatron_archer.algorithms.order_stats import floor_count
from tests.algorithms.reference import policy_loss_reference

AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
M32 = 0xFFFFFFFF
SALTS = (7, 3, 0, 1)


# --- the reference, from the definitions (numpy, float64, independent of megatron_archer) ---

def ref_mix(x):
    """mix32 on uint64 numpy arrays or Python ints: x ^= x >> 16; x *= 0x45d9f3b (mod 2^32), twice."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def ref_hash(salts, sequence_id, position):
    base = 0
    for salt in salts:
        base = ref_mix(base ^ (salt & M32))
    row = ref_mix((sequence_id & M32) ^ base)
    return ref_mix(ref_mix(row ^ position) ^ row)


def ref_grid_mean(values):
    """The documented mean: of the values rounded to multiples of 2^-53, an exact integer sum
    divided once (Python's int / int rounds correctly); exact for float32 values."""
    total = sum(int(v) for v in np.rint(np.asarray(values, dtype=np.float64) * 2.0 ** 53))
    return total / (len(values) << 53)


def ref_select(old, cur, adv, hashes, selection):
    """Bool per flat token: excluded (Clip-Cov) or penalised (KL-Cov). ``old`` gives the step
    constants, ``cur`` each token's covariance in the forward."""
    n = len(old)
    if n == 0:
        return np.zeros(0, dtype=bool)
    mean_a, mean_l = ref_grid_mean(adv), ref_grid_mean(old)
    cov_old = (adv - mean_a) * (old - mean_l)
    cov_cur = (adv - mean_a) * (cur - mean_l)
    ratio = selection.clip_cov.ratio if selection.method == "clip_cov" else selection.kl_cov.ratio
    k = max(1, math.floor(ratio * n + 1e-9))
    if selection.method == "clip_cov":
        lb, ub = selection.clip_cov.lb, selection.clip_cov.ub
        band_old = (cov_old >= lb) & (cov_old <= ub)
        drawn = min(k, int(band_old.sum()))
        if drawn == 0:
            return np.zeros(n, dtype=bool)
        cut = sorted(hashes[band_old].tolist(), reverse=True)[drawn - 1]
        return (cov_cur >= lb) & (cov_cur <= ub) & (hashes >= cut)
    # rank by covariance (compared in float32), ties broken by the hash
    keys = sorted(zip(cov_old.astype(np.float32).tolist(), hashes.tolist()), reverse=True)
    cut = keys[k - 1]
    return np.array([(c, h) >= cut for c, h in zip(cov_cur.astype(np.float32).tolist(),
                                                     hashes.tolist())], dtype=bool)


# --- random steps ---

def make_step(seed, lengths=None, noise=0.1):
    """Responses (per-response float64 arrays of float32 values, as the trainer's) with a 1-token
    and an empty response; the forward's log-probs ``cur`` are ``noise`` away from the old."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(1, 14, size=16)
        lengths[2], lengths[9] = 0, 1
    out = []
    as32 = lambda x: np.float32(x).astype(np.float64)  # noqa: E731
    for i, length in enumerate(lengths):
        old = as32(-3 * rng.random(length))
        out.append(dict(id=int(1000 + 37 * i), old=old,
                        cur=as32(old + noise * rng.standard_normal(length)),
                        adv=float(as32(1.5 * rng.standard_normal()))))
    return out


def split(responses, sizes):
    """Micro-batches of consecutive responses, each right-padded (with NaN) to its own width."""
    batches, start = [], 0
    for size in sizes:
        part = responses[start:start + size]
        start += size
        width = max([len(r["cur"]) for r in part] + [1])
        mask = torch.zeros(len(part), width, dtype=torch.bool)
        cur = torch.full((len(part), width), float("nan"), dtype=torch.float64)
        old = cur.clone()
        for i, r in enumerate(part):
            mask[i, :len(r["cur"])] = True
            cur[i, :len(r["cur"])] = torch.from_numpy(r["cur"])
            old[i, :len(r["old"])] = torch.from_numpy(r["old"])
        adv = torch.tensor([r["adv"] for r in part], dtype=torch.float64)
        ids = torch.tensor([r["id"] for r in part], dtype=torch.int64)
        batches.append(dict(mask=mask, cur=cur, old=old, adv=adv,
                            hash=token_hash(SALTS, ids, width)))
    assert start == len(responses)
    return batches


def flat(responses, key):
    return np.concatenate([np.asarray(r[key], dtype=np.float64) if key != "adv"
                           else np.full(len(r["cur"]), r["adv"]) for r in responses])


def flat_hashes(responses):
    return np.array([ref_hash(SALTS, r["id"], t) for r in responses for t in range(len(r["cur"]))],
                    dtype=np.int64)


def run_step(batches, selection, loss_cfg):
    """Our step: context from the old log-probs, then each micro-batch's selection and loss."""
    ctx = build_step_context([(None, b["mask"]) for b in batches], selection,
                             covariance=[CovarianceTokens(b["old"], b["adv"], b["hash"]) for b in batches])
    outs = []
    for b in batches:
        sel = select_tokens(None, b["mask"], selection, loss_cfg,
                            covariance=CovarianceTokens(b["cur"], b["adv"], b["hash"]),
                            covariance_stats=ctx.covariance)
        logp = b["cur"].clone().requires_grad_(True)
        out = policy_loss(logp, b["old"], b["adv"], b["mask"], sel, ctx, loss_cfg)
        (grad,) = torch.autograd.grad(out.loss, [logp])
        outs.append((sel, out, grad))
    return ctx, outs


def clip_cov(**kw):
    return SelectionConfig("clip_cov", clip_cov=ClipCovConfig(**kw))


def kl_cov(**kw):
    return SelectionConfig("kl_cov", kl_cov=KLCovConfig(**kw))


CASES = {
    "clip_cov_paper": clip_cov(),
    "clip_cov_band_larger_than_budget": clip_cov(ratio=0.02, lb=0.2, ub=2.0),
    "clip_cov_budget_larger_than_band": clip_cov(ratio=0.5, lb=1.0, ub=3.0),
    "clip_cov_everything": clip_cov(ratio=1.0, lb=-100.0, ub=100.0),
    "clip_cov_closed_band": clip_cov(ratio=1.0, lb=0.0, ub=0.0),  # exactly-0 covariances only
    "kl_cov_paper": kl_cov(),
    "kl_cov_tenth": kl_cov(ratio=0.1, coef=0.7),
    "kl_cov_all": kl_cov(ratio=1.0, coef=2.0),
}


def check_against_reference(responses, sizes, selection, loss_cfg):
    """Selection, loss and gradient of every micro-batch equal the reference's; returns the flat
    reference selection."""
    batches = split(responses, sizes)
    ctx, outs = run_step(batches, selection, loss_cfg)
    want = ref_select(flat(responses, "old"), flat(responses, "cur"), flat(responses, "adv"),
                      flat_hashes(responses), selection)
    got = np.concatenate([sel.high_share[b["mask"]].numpy() for b, (sel, _, _) in zip(batches, outs)])
    np.testing.assert_array_equal(got.astype(bool), want)
    start = 0
    for b, (sel, out, grad) in zip(batches, outs):
        mask = b["mask"].numpy()
        chosen = np.zeros(mask.shape)
        count = int(mask.sum())
        chosen[mask] = want[start:start + count]
        start += count
        if ctx.num_tokens == 0:  # a step without tokens: a zero loss (the reference divides by 0)
            assert out.loss.item() == 0.0 and torch.all(grad == 0)
            continue
        clip = selection.method == "clip_cov"
        kappa = selection.kl_cov.coef * chosen if not clip else None
        loss, dlogp, _ = policy_loss_reference(
            logp=b["cur"].numpy(), old=b["old"].numpy(), adv=b["adv"].numpy(), mask=mask,
            pg_weight=mask - chosen if clip else mask.astype(np.float64),
            eps_low=loss_cfg.clip.eps_low, eps_high=loss_cfg.clip.eps_high,
            kl_coef=0.0, high_share=chosen, class_kl_coef=(0.0, 0.0), dual_clip=loss_cfg.dual_clip,
            ref=None, estimator=None, kl_aggregation="token", entropy=None, entropy_coef=0.0,
            aggregation=loss_cfg.aggregation, n_tokens=ctx.num_tokens, n_seqs=ctx.num_sequences,
            n_selected=ctx.num_selected, by_selected=False, class_tokens=ctx.class_tokens,
            norm_length=loss_cfg.norm_length, abs_kl_coef=kappa)
        assert out.loss.item() == pytest.approx(loss, rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(grad.numpy(), dlogp, rtol=1e-10, atol=1e-14)
        assert torch.all(grad[~b["mask"]] == 0)
    return want, ctx


def loss_config(aggregation):
    return LossConfig(clip=Constraints(0.2, 0.28, 0.0), dual_clip=3.0, aggregation=aggregation,
                      norm_length=13 if aggregation == "seq-mean-token-sum-norm" else None)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_selection_loss_and_gradient_match_the_float64_reference(case, aggregation):
    seed = zlib.crc32(f"{case}/{aggregation}".encode())
    responses = make_step(seed)
    want, ctx = check_against_reference(responses, [5, 4, 7], CASES[case], loss_config(aggregation))
    n = int(ctx.num_tokens)
    selection = CASES[case]
    ratio = selection.clip_cov.ratio if case.startswith("clip") else selection.kl_cov.ratio
    assert ctx.covariance.budget == max(1, math.floor(ratio * n + 1e-9))
    stats = ctx.covariance
    # the cases are reached (at step start; the forward's log-probs moved a little since)
    if case == "clip_cov_band_larger_than_budget":
        assert stats.band_tokens > stats.budget
    if case == "clip_cov_budget_larger_than_band":
        assert 0 < stats.band_tokens < stats.budget and 0 < want.sum() < n
    if case == "kl_cov_tenth":
        assert 0 < want.sum() < n


@pytest.mark.parametrize("case", list(CASES))
def test_at_the_first_update_exactly_the_budget_is_taken(case):
    """With the current policy equal to the old one (the first update of a batch), KL-Cov
    penalises exactly k = max(1, floor(ratio N)) tokens (the authors' torch.topk) and Clip-Cov
    drops min(k, band) tokens, all inside the band."""
    selection = CASES[case]
    responses = make_step(zlib.crc32(case.encode()))
    for r in responses:
        r["old"] = r["cur"].copy()
    want, ctx = check_against_reference(responses, [16], selection, loss_config("token-mean"))
    n = int(ctx.num_tokens)
    stats = ctx.covariance
    if selection.method == "kl_cov":
        assert want.sum() == floor_count(selection.kl_cov.ratio, n)
        cov = (flat(responses, "adv") - stats.mean_advantage) * (flat(responses, "cur") - stats.mean_logp)
        top = np.argsort(-cov, kind="stable")[:int(want.sum())]  # no ties in these steps
        assert set(np.flatnonzero(want)) == set(top.tolist())
    else:
        assert want.sum() == min(stats.budget, stats.band_tokens)


@pytest.mark.parametrize("case", list(CASES))
def test_nasty_steps(case):
    selection, cfg = CASES[case], loss_config("seq-mean-token-mean")
    # all-equal advantages: every covariance is 0 (Clip-Cov's band [1, 5] is empty; KL-Cov's
    # ranking is all ties, broken by the hash, so still exactly k at the first update)
    equal = make_step(1, noise=0.0)
    for r in equal:
        r["adv"] = float(np.float32(0.1))
    want, ctx = check_against_reference(equal, [6, 10], selection, cfg)
    assert ctx.covariance.mean_advantage == equal[0]["adv"]
    in_band = selection.clip_cov.lb <= 0 <= selection.clip_cov.ub
    taken = floor_count(selection.kl_cov.ratio, int(ctx.num_tokens)) \
        if selection.method == "kl_cov" else (ctx.num_tokens if in_band else 0)
    assert want.sum() == taken
    # one token in the whole step, among empty responses
    single = make_step(2, lengths=[0, 1, 0])
    want, ctx = check_against_reference(single, [2, 1], selection, cfg)
    stats = ctx.covariance
    assert (stats.mean_logp, stats.mean_advantage) == (single[1]["old"][0], single[1]["adv"])
    assert want.tolist() == [selection.method == "kl_cov" or in_band]  # its cov is exactly 0
    # no token at all: nothing selected, a zero loss
    empty = make_step(3, lengths=[0, 0])
    _, ctx = check_against_reference(empty, [1, 1], selection, cfg)
    assert ctx.covariance.budget == 0 and ctx.covariance.kl_key is None


def test_means_are_exact_and_the_constants_split_free():
    responses = make_step(4, lengths=[13] * 40)
    old = flat(responses, "old")
    selection = kl_cov(ratio=0.1)
    stats = []
    for sizes in ([40], [1, 39], [7, 13, 20], [20, 20]):
        batches = split(responses, sizes)
        ctx = build_step_context([(None, b["mask"]) for b in batches], selection,
                                 covariance=[CovarianceTokens(b["old"], b["adv"], b["hash"])
                                             for b in batches])
        stats.append(ctx.covariance)
    assert all(s == stats[0] for s in stats)  # bit for bit, thresholds included
    # float32 values: the grid is exact, so the mean is the exact mean, correctly rounded
    exact = sum(Fraction(v) for v in old.tolist()) / len(old)
    assert stats[0].mean_logp == float(exact)


def test_token_hash_matches_the_reference_and_is_uniform():
    ids = torch.tensor([0, 1, 5, 2**33 + 5, 123456789])
    got = token_hash((3, 2**40 + 1), ids, 50)
    want = [[ref_hash((3, 2**40 + 1), i, t) for t in range(50)] for i in ids.tolist()]
    assert got.tolist() == want
    # the rows of a sub-batch hash the same: identity, not position in the batch
    assert torch.equal(token_hash((3, 2**40 + 1), ids[2:4], 20), got[2:4, :20])
    # uniform over [0, 2^32): 16 bins of 2^28, n = 2^16 tokens, each bin Binomial(n, 1/16)
    h = token_hash((9,), torch.arange(256), 256).flatten()
    counts = torch.bincount(h >> 28, minlength=16).double()
    sd = math.sqrt(h.numel() / 16 * 15 / 16)
    assert torch.all((counts - h.numel() / 16).abs() < 6 * sd)
    assert h.unique().numel() > h.numel() - 10  # collisions: about n^2 / 2^33 = 0.5 expected
    assert not torch.equal(token_hash((10,), torch.arange(4), 8), token_hash((9,), torch.arange(4), 8))


def test_metrics_report_the_share_clipped_or_penalised():
    responses = make_step(5)
    for selection in (CASES["clip_cov_budget_larger_than_band"], CASES["kl_cov_tenth"]):
        batches = split(responses, [8, 8])
        ctx, outs = run_step(batches, selection, loss_config("token-mean"))
        metrics = reduce_loss_metrics([loss_metric_sums(out.terms, sel) for sel, out, _ in outs])
        chosen = sum(float(sel.high_share.sum()) for sel, _, _ in outs)
        assert 0 < chosen < ctx.num_tokens
        assert metrics["high/token_share"] == chosen / ctx.num_tokens


def test_inputs_are_checked_naming_the_problem():
    responses = make_step(6)
    (b,) = split(responses, [16])
    sel = clip_cov()
    with pytest.raises(ValueError, match="needs covariance inputs for each of the 1 micro-batches"):
        build_step_context([(None, b["mask"])], sel)
    bad = b["old"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logp \(micro-batch 0\) has 1 non-finite"):
        build_step_context([(None, b["mask"])], sel,
                           covariance=[CovarianceTokens(bad, b["adv"], b["hash"])])
    with pytest.raises(ValueError, match="token_hash .*must be int64"):
        build_step_context([(None, b["mask"])], sel,
                           covariance=[CovarianceTokens(b["old"], b["adv"], b["hash"].int())])
    with pytest.raises(ValueError, match="needs the micro-batch's covariance inputs"):
        select_tokens(None, b["mask"], sel, LossConfig())
    with pytest.raises(ValueError, match="sequence_ids must be a 1-D tensor of non-negative ids"):
        token_hash((1,), torch.tensor([-1]), 3)


@pytest.mark.parametrize("data, message", [
    ({"selection": {"method": "clip_cov", "clip_cov": {"ratio": 0.0}}},
     "selection.clip_cov.ratio must be in (0.0, 1.0]"),
    ({"selection": {"method": "clip_cov", "clip_cov": {"lb": 2.0, "ub": 1.0}}},
     "selection.clip_cov.ub must be >= lb (2.0); got 1.0"),
    ({"selection": {"method": "kl_cov", "kl_cov": {"coef": -1}}}, "selection.kl_cov.coef must be in"),
    ({"selection": {"method": "kl_cov", "kl_cov": {"ratio": 2}}}, "selection.kl_cov.ratio must be in"),
    ({"selection": {"kl_cov": {"ratio": 0.1}}},
     "selection.kl_cov is set but selection.method is 'none'"),
    ({"selection": {"method": "kl_cov", "clip_cov": {"ratio": 0.1}}},
     "selection.clip_cov is set but selection.method is 'kl_cov'"),
    ({"selection": {"method": "clip_cov", "entropy_source": "old"}},
     "selection.entropy_source is set but selection.method 'clip_cov' does not select by entropy"),
])
def test_config_errors_name_the_field(data, message):
    with pytest.raises(ValueError) as error:
        config_from_dict(data)
    assert message in str(error.value)


def test_one_config_change_on_a_preset_and_the_papers_defaults():
    cfg = config_from_dict({"preset": "dapo", "selection": {"method": "clip_cov"}})
    assert cfg.selection.clip_cov == ClipCovConfig(ratio=2e-4, lb=1.0, ub=5.0)
    assert cfg.loss.clip == Constraints(0.2, 0.28, 0.0)  # the base's clip is kept
    cfg = config_from_dict({"preset": "dapo", "selection": {"method": "kl_cov"}})
    assert cfg.selection.kl_cov == KLCovConfig(ratio=2e-3, coef=1.0)
    assert isinstance(cfg, AlgorithmConfig)


def test_content_ids_follow_the_tokens_not_the_batch():
    a, b = torch.tensor([5, 1, 9, 9, 2]), torch.tensor([5, 1, 9, 2, 9])
    ids = content_ids([a, b, a.clone(), a[:4], torch.tensor([2**40 + 5, 1])])
    assert ids[0] == ids[2]  # the same tokens: the same id, wherever the sequence sits
    assert len({ids[0].item(), ids[1].item(), ids[3].item(), ids[4].item()}) == 4  # order, length
    assert torch.equal(content_ids([b, a]), ids[[1, 0]])
    assert bool(((ids >= 0) & (ids < 2**32)).all())
