"""fused_lm_head_logprobs_and_entropy against a float64 full-vocabulary reference (SPEC §1).

The reference materialises hidden.double() @ weight.double().T over the real vocabulary and takes
its log-softmax (tests/ops/reference.py); nothing here reuses the code under test. -inf logit
entries, tested for vocab_parallel, cannot be expressed through finite hidden states and weights:
the only excluded columns are vocabulary padding (covered here), and non-finite inputs are errors.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_archer.ops import fused_lm_head_logprobs_and_entropy as op
from tests.distributed import run_distributed
from tests.ops.reference import reference_logprobs_entropy, rel_err

FP32_TOL = 1e-5
FP64_TOL = 1e-12


def _make_case(seed, lead, hidden_size, padded_vocab, *, dtype=torch.float32, offset=0.0):
    """Full hidden [*lead, H] and padded weight [V, H], the same on every rank for a seed.

    With an ``offset`` the entries are multiples of 1/4 and 1/4 plus one constant column, so the
    logits (offset + a spread of a few units) are exact in fp32 whatever the summation order:
    the test then measures the softmax numerics at |z| ~ 1e4, not the matmul's rounding.
    """
    gen = torch.Generator().manual_seed(seed)
    if offset:
        hidden = torch.randint(-8, 9, (*lead, hidden_size), generator=gen) / 4
        weight = torch.randint(-4, 5, (padded_vocab, hidden_size), generator=gen) / 4
        hidden[..., 0], weight[:, 0] = 100.0, offset / 100.0
    else:
        hidden = torch.randn(*lead, hidden_size, generator=gen)
        weight = torch.randn(padded_vocab, hidden_size, generator=gen) * (3 / hidden_size**0.5)
    return hidden.to(dtype), weight.to(dtype)


def _reference(hidden, weight, labels, temperature, vocab_size):
    """float64 (logp, entropy) and their leaf inputs, from the materialised real-vocab logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logp, entropy = reference_logprobs_entropy(h @ w[:vocab_size].T, labels, temperature=temperature)
    return logp, entropy, h, w


def _upstream(shape, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))


def _run(hidden, weight, labels, **kwargs):
    """(logp, entropy, d_hidden, d_weight) for loss = sum(logp * g1 + entropy * g2)."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy = op(h, w, labels, entropy_grad=True, **kwargs)
    g_lp, g_h = _upstream(labels.shape)
    (logp * g_lp.to(logp.dtype) + entropy * g_h.to(logp.dtype)).sum().backward()
    return logp, entropy, h.grad, w.grad


def _tolerances(dtype):
    """(values, gradients): values are fp32 (fp64) whatever the inputs; gradients come back in
    the inputs' dtype, so half-precision ones are within its unit roundoff eps / 2 per entry."""
    if dtype == torch.float64:
        return FP64_TOL, FP64_TOL
    if dtype in (torch.bfloat16, torch.float16):
        return FP32_TOL, torch.finfo(dtype).eps / 2 + FP32_TOL
    return FP32_TOL, FP32_TOL


def _check_local(hidden, weight, labels, *, temperature=1.0, vocab_size=None, **kwargs):
    """One process, no tensor parallelism: values and gradients vs float64."""
    logp, entropy, d_h, d_w = _run(
        hidden, weight, labels, temperature=temperature, vocab_size=vocab_size, **kwargs
    )
    logp_ref, entropy_ref, h_ref, w_ref = _reference(hidden, weight, labels, temperature, vocab_size)
    g_lp, g_h = _upstream(labels.shape)
    (logp_ref * g_lp + entropy_ref * g_h).sum().backward()
    val_tol, grad_tol = _tolerances(hidden.dtype)
    assert logp.shape == labels.shape
    assert logp.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert rel_err(logp, logp_ref) < val_tol and rel_err(entropy, entropy_ref) < val_tol
    assert d_h.dtype == hidden.dtype and d_w.dtype == weight.dtype
    assert rel_err(d_h, h_ref.grad) < grad_tol and rel_err(d_w, w_ref.grad) < grad_tol
    return d_w


@pytest.mark.parametrize(
    "dtype, temperature", [(torch.float32, 1.0), (torch.float32, 0.6), (torch.bfloat16, 1.7), (torch.float16, 0.8)]
)
def test_values_and_grads(dtype, temperature):
    """Padded vocab, tiles that divide neither the tokens nor the vocabulary."""
    hidden, weight = _make_case(0, (3, 5), 24, 37, dtype=dtype)
    labels = torch.randint(0, 33, (3, 5), generator=torch.Generator().manual_seed(1))
    d_w = _check_local(hidden, weight, labels, temperature=temperature, vocab_size=33,
                       chunk_size=4, vocab_chunk_size=7)
    assert torch.all(d_w[33:] == 0)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_logits_of_magnitude_1e4(offset):
    """All logits near +1e4 or near -1e4 (a running max started at 0 fails the latter)."""
    hidden, weight = _make_case(2, (11,), 16, 40, offset=offset)
    labels = torch.randint(0, 40, (11,), generator=torch.Generator().manual_seed(3))
    _check_local(hidden, weight, labels, temperature=0.7, chunk_size=4, vocab_chunk_size=16)


def test_padding_rows_take_no_part():
    """Garbage (even NaN) in the weight's padding rows changes nothing; their gradient is 0."""
    hidden, weight = _make_case(4, (6,), 8, 20)
    weight[13:] = math.nan
    labels = torch.arange(6) * 2
    d_w = _check_local(hidden, weight, labels, vocab_size=13, temperature=1.3, vocab_chunk_size=5)
    assert torch.all(d_w[13:] == 0)


def test_chunked_equals_unchunked():
    hidden, weight = _make_case(5, (13,), 12, 30, dtype=torch.bfloat16)
    labels = torch.randint(0, 30, (13,), generator=torch.Generator().manual_seed(6))
    results = [
        _run(hidden, weight, labels, temperature=0.7, chunk_size=c, vocab_chunk_size=v)
        for c, v in [(None, None), (1, 1), (4, 7), (13, 30), (100, 1000)]
    ]
    for result in results[1:]:
        for got, expected in zip(result, results[0]):
            assert rel_err(got, expected) < (2e-6 if got.dtype == torch.float32 else _tolerances(torch.bfloat16)[1])


def test_float64_gradcheck():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(9, 4, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 7, (2, 3), generator=gen)

    def both(h, w):
        return op(h, w, labels, temperature=1.4, vocab_size=7, chunk_size=4, vocab_chunk_size=3,
                  entropy_grad=True)

    assert torch.autograd.gradcheck(both, (hidden, weight))


def test_entropy_detached_unless_asked_and_empty_input():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    logp, entropy = op(hidden, weight, labels)
    assert logp.requires_grad and not entropy.requires_grad
    assert op(hidden, weight, labels, entropy_grad=True)[1].requires_grad
    logp, entropy = op(hidden[:0], weight, labels[:0])
    assert logp.shape == entropy.shape == (0,)
    logp.sum().backward()
    assert torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


def _errors_cases():
    h, w, y = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 4, 1])
    nan_h, inf_w, neg_inf_w = h.clone(), w.clone(), w.clone()
    nan_h[1, 3], inf_w[2, 0], neg_inf_w[2, 0] = math.nan, math.inf, -math.inf
    return [
        ((h, w, torch.tensor([0, 5, 1])), {}, ValueError, "token id 5 at flat index 1"),
        ((h, w, torch.tensor([0, -1, 1])), {}, ValueError, "outside the vocabulary"),
        ((h, w, y), {"vocab_size": 4}, ValueError, "token id 4"),  # a label in the padding
        ((h, torch.randn(5, 7), y), {}, ValueError, "hidden size 7"),
        ((h, w, torch.zeros(4, dtype=torch.long)), {}, ValueError, "leading shape"),
        ((h, w.double(), y), {}, TypeError, "share a dtype"),
        ((h.long(), w.long(), y), {}, TypeError, "hidden must be"),
        ((h, w, y.float()), {}, TypeError, "integer"),
        ((nan_h, w, y), {}, ValueError, r"not finite for token\(s\) at flat index \[1\]"),
        ((h, inf_w, y), {}, ValueError, "not finite"),
        ((h.abs(), neg_inf_w, y), {}, ValueError, "not finite"),  # logits -inf, gradients NaN
        ((h * 1e30, w * 1e30, y), {}, ValueError, "overflow"),
        ((h, w, y), {"temperature": 0.0}, ValueError, "temperature"),
        ((h, w, y), {"vocab_chunk_size": 0}, ValueError, "vocab_chunk_size"),
        ((h, w, y), {"implementation": "cuda"}, ValueError, "implementation"),
    ]


@pytest.mark.parametrize("args, kwargs, error, match", _errors_cases())
def test_bad_input_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        op(*args, **kwargs)


# --- real tensor parallelism: gloo processes, each holding one vocabulary slice of the weight ---

TP_CASES = [  # (dtype, temperature, padding, chunk_size, vocab_chunk_size, offset, entropy_grad)
    (torch.float32, 1.0, 0, None, None, 0.0, True),
    (torch.float32, 0.6, 5, 3, 4, 0.0, True),
    (torch.float32, 1.3, 5, 4, 3, 0.0, False),
    (torch.float32, 0.7, 0, 4, 5, 1e4, True),
    (torch.float32, 1.0, 3, None, 8, -1e4, True),
    (torch.bfloat16, 1.3, 5, 3, 4, 0.0, True),
    (torch.float64, 0.9, 2, 2, 3, 0.0, True),
]
LOCAL_VOCAB = 11


def _tp_cases(world):
    cases = list(TP_CASES)
    if world > 1:  # the last rank holds only padding
        cases.append((torch.float32, 0.8, LOCAL_VOCAB + 2, 4, 5, 0.0, True))
    return cases


def _tp_check(group, case, seed):
    """One case on one tensor-parallel group: this rank's outputs and gradients vs float64."""
    dtype, temperature, padding, chunk, vchunk, offset, entropy_grad = case
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    vocab = LOCAL_VOCAB * world - padding
    hidden, weight = _make_case(seed, (2, 5), 16, LOCAL_VOCAB * world, dtype=dtype, offset=offset)
    weight[vocab:] = math.nan  # padding must take no part
    labels = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed))
    starts = torch.arange(world) * LOCAL_VOCAB
    real = starts < vocab
    labels.view(-1)[: int(real.sum())] = starts[real]  # every rank with real tokens owns a label
    start = rank * LOCAL_VOCAB
    if start < vocab:
        assert ((labels >= start) & (labels < start + LOCAL_VOCAB)).any()

    h = hidden.clone().requires_grad_()
    w = weight[start : start + LOCAL_VOCAB].clone().requires_grad_()
    logp, entropy = op(h, w, labels, temperature=temperature, tp_group=group, vocab_size=vocab,
                       chunk_size=chunk, vocab_chunk_size=vchunk, entropy_grad=entropy_grad)
    logp_ref, entropy_ref, h_ref, w_ref = _reference(hidden, weight, labels, temperature, vocab)
    g_lp, g_h = _upstream(labels.shape)
    loss = (logp * g_lp.to(logp.dtype)).sum()
    loss_ref = (logp_ref * g_lp).sum()
    if entropy_grad:
        loss, loss_ref = loss + (entropy * g_h.to(logp.dtype)).sum(), loss_ref + (entropy_ref * g_h).sum()
    else:
        assert not entropy.requires_grad
    loss.backward()
    loss_ref.backward()

    val_tol, grad_tol = _tolerances(dtype)
    assert rel_err(logp, logp_ref) < val_tol and rel_err(entropy, entropy_ref) < val_tol
    assert rel_err(h.grad, h_ref.grad) < grad_tol  # d_hidden: all-reduced over the group
    w_ref_grad = w_ref.grad[start : start + LOCAL_VOCAB]
    if w_ref_grad.norm() == 0:  # a rank of pure padding
        assert torch.all(w.grad == 0)
    else:
        assert rel_err(w.grad, w_ref_grad) < grad_tol
    assert torch.all(w.grad[max(vocab - start, 0) :] == 0)


def _tp_worker(rank, world_size):
    """TP 1, 2 and 4 in one spawn: the 4 ranks form 4 groups of 1, 2 groups of 2, 1 group of 4."""
    for tp in (1, 2, 4):
        group, _ = dist.new_subgroups(group_size=tp)
        for seed, case in enumerate(_tp_cases(tp)):
            try:
                _tp_check(group, case, seed)
            except AssertionError as error:
                raise AssertionError(f"tp={tp} case={case}") from error
    # A NaN in one rank's slice: every rank raises, none is left waiting in a collective.
    hidden, weight = _make_case(0, (3,), 8, 4 * LOCAL_VOCAB)
    weight = weight[rank * LOCAL_VOCAB : (rank + 1) * LOCAL_VOCAB].clone()
    if rank == 2:
        weight[1, 2] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        op(hidden, weight, torch.tensor([0, 1, 2]), tp_group=dist.group.WORLD)


def test_tensor_parallel_1_2_4():
    run_distributed(_tp_worker, 4)
