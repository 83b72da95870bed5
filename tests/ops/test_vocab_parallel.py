"""vocab_parallel_logprobs_and_entropy against a float64 full-vocabulary reference (docs/numerics.md §1)."""

import math

import pytest
import torch
import torch.distributed as dist

from megatron_archer.ops import vocab_parallel_logprobs_and_entropy as op
from tests.distributed import run_distributed
from tests.numerics import assert_as_accurate
from tests.ops.reference import reference_logprobs_entropy, rel_err

# Norm-wise relative error of float32 results against float64 (the inputs are the same float32
# values, so only the op's arithmetic counts). Per token the op takes a max (exact), subtracts it
# (exact: Sterbenz, or an error of eps |z|), sums V exps (relative error below ~sqrt(V) eps for
# random terms, V <= 1000 here) and takes a log; the results' error is a few eps times
# |z|max / |result| ~ 2-10 for these cases, i.e. ~1e-6. 1e-5 (~84 eps) bounds that with room for
# the worst summation order, and a wrong formula is off by far more.
FP32_TOL = 1e-5
BF16_GRAD_TOL = 1e-2  # the gradient is returned in bf16: 2^-8 relative rounding per entry


def _random_case(gen, shape, vocab, scale=3.0, offset=0.0, dtype=torch.float32):
    logits = (torch.randn(*shape, vocab, generator=gen) * scale + offset).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    return logits, labels


def _check_against_reference(logits, labels, *, temperature=1.0, vocab_size=None, chunk_size=None,
                             grad_tol=FP32_TOL):
    """Values and gradients (of logp and entropy, random upstream grads) vs float64."""
    gen = torch.Generator().manual_seed(1)
    z = logits.clone().requires_grad_()
    logp, entropy = op(z, labels, temperature=temperature, vocab_size=vocab_size,
                       chunk_size=chunk_size, entropy_grad=True)
    z_ref = logits.detach().double().requires_grad_()
    logp_ref, entropy_ref = reference_logprobs_entropy(z_ref, labels, temperature=temperature,
                                                       vocab_size=vocab_size)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert rel_err(logp, logp_ref) < FP32_TOL
    assert rel_err(entropy, entropy_ref) < FP32_TOL
    g_lp = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    g_h = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    (logp * g_lp.float() + entropy * g_h.float()).sum().backward()
    (logp_ref * g_lp + entropy_ref * g_h).sum().backward()
    assert z.grad.dtype == logits.dtype
    assert rel_err(z.grad, z_ref.grad) < grad_tol


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fp32_values_and_grads(temperature, chunk_size):
    gen = torch.Generator().manual_seed(0)
    logits, labels = _random_case(gen, (3, 5), 97)
    _check_against_reference(logits, labels, temperature=temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Values are exact up to fp32 (the upcast is exact); gradients within half rounding."""
    gen = torch.Generator().manual_seed(2)
    logits, labels = _random_case(gen, (4, 6), 131, dtype=dtype)
    _check_against_reference(logits, labels, temperature=0.8, chunk_size=5, grad_tol=BF16_GRAD_TOL)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_logits_of_magnitude_1e4(offset):
    gen = torch.Generator().manual_seed(3)
    logits, labels = _random_case(gen, (2, 7), 64, scale=2.0, offset=offset)
    _check_against_reference(logits, labels, temperature=0.9)
    spread, _ = _random_case(gen, (5,), 64, scale=1e4)  # entropies ~0: a stiff distribution
    _check_against_reference(spread, torch.randint(0, 64, (5,), generator=gen))


def test_padded_vocab_is_excluded():
    gen = torch.Generator().manual_seed(4)
    logits, labels = _random_case(gen, (6,), 48)
    labels = labels % 37
    logits[:, 37:] = 1e4  # garbage in padding must not enter the softmax
    _check_against_reference(logits, labels, vocab_size=37, temperature=1.3)
    z = logits.clone().requires_grad_()
    logp, _ = op(z, labels, vocab_size=37)
    logp.sum().backward()
    assert torch.all(z.grad[:, 37:] == 0)


def test_minus_inf_entries():
    gen = torch.Generator().manual_seed(5)
    logits, labels = _random_case(gen, (8,), 30)
    logits[:, ::3] = -math.inf
    labels = labels // 3 * 3 + 1  # finite-logit labels...
    labels[0] = 3  # a label whose logit is -inf: log-prob -inf, gradient still finite
    logp, entropy = op(logits, labels)
    assert logp[0] == -math.inf and torch.isfinite(logp[1:]).all()
    keep = torch.arange(1, 8)
    _check_against_reference(logits[keep], labels[keep], temperature=0.7)
    z = logits.clone().requires_grad_()
    logp, entropy = op(z, labels, entropy_grad=True)
    (logp[1:].sum() + entropy.sum()).backward()
    assert torch.isfinite(z.grad).all() and torch.all(z.grad[:, ::3] == 0)


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(6)
    logits, labels = _random_case(gen, (13,), 50, dtype=torch.bfloat16)
    results = []
    z_ref = logits.double().requires_grad_()
    logp_ref, entropy_ref = reference_logprobs_entropy(z_ref, labels, temperature=0.7)
    (logp_ref.sum() + 0.5 * entropy_ref.sum()).backward()
    for chunk_size in (None, 1, 4, 13, 100):
        z = logits.clone().requires_grad_()
        logp, entropy = op(z, labels, chunk_size=chunk_size, temperature=0.7, entropy_grad=True)
        (logp.sum() + 0.5 * entropy.sum()).backward()
        results.append((logp, entropy, z.grad))
    for logp, entropy, grad in results[1:]:  # as accurate as unchunked (tests/numerics.py)
        assert_as_accurate(logp, results[0][0], logp_ref, "logp")
        assert_as_accurate(entropy, results[0][1], entropy_ref, "entropy")
        assert_as_accurate(grad, results[0][2], z_ref.grad, "gradient")


def test_float64_gradcheck():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 9, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 7, (3, 4), generator=gen)

    def both(z):
        return op(z, labels, temperature=1.4, vocab_size=7, chunk_size=5, entropy_grad=True)

    assert torch.autograd.gradcheck(both, (logits,))


def test_entropy_detached_unless_asked():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    logp, entropy = op(logits, labels)
    assert logp.requires_grad and not entropy.requires_grad
    logp, entropy = op(logits, labels, entropy_grad=True)
    assert entropy.requires_grad


def test_callers_logits_untouched():
    gen = torch.Generator().manual_seed(8)
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels = _random_case(gen, (5,), 33, dtype=dtype)
        original = logits.clone()
        z = logits.requires_grad_()
        logp, entropy = op(z, labels, temperature=1.0, entropy_grad=True)
        (logp.sum() + entropy.sum()).backward()
        assert torch.equal(z.detach(), original)


def test_empty_input():
    logits = torch.randn(0, 11, requires_grad=True)
    logp, entropy = op(logits, torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and entropy.shape == (0,)
    logp.sum().backward()
    assert logits.grad.shape == (0, 11)


def test_non_contiguous_logits():
    gen = torch.Generator().manual_seed(9)
    logits, labels = _random_case(gen, (4, 3), 21)  # [s, b, V] as Megatron emits it
    _check_against_reference(logits.transpose(0, 1), labels.t())


@pytest.mark.parametrize(
    "make_input, error, match",
    [
        (lambda: (torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError, "token id 5 at flat index 1"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, -1, 1])), ValueError, "outside the vocabulary"),
        (lambda: (torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), ValueError, "shape"),
        (lambda: (torch.randn(3, 5), torch.zeros(3)), TypeError, "integer"),
        (lambda: (torch.randint(0, 9, (3, 5)), torch.zeros(3, dtype=torch.long)), TypeError, "logits"),
        (lambda: (torch.tensor([[0.0, math.nan]]), torch.tensor([0])), ValueError, "NaN or \\+inf"),
        (lambda: (torch.tensor([[0.0, math.inf]]), torch.tensor([0])), ValueError, "NaN or \\+inf"),
        (lambda: (torch.full((2, 3), -math.inf), torch.tensor([0, 1])), ValueError, "every entry is -inf"),
    ],
)
def test_bad_input_errors(make_input, error, match):
    logits, labels = make_input()
    with pytest.raises(error, match=match):
        op(logits, labels)


def test_bad_options_errors():
    logits, labels = torch.randn(2, 8), torch.tensor([0, 7])
    with pytest.raises(ValueError, match="temperature"):
        op(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        op(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size=9"):
        op(logits, labels, vocab_size=9)
    with pytest.raises(ValueError, match="token id 7"):
        op(logits, labels, vocab_size=6)  # a label in the padding


# --- real tensor parallelism: gloo processes, each holding one vocabulary shard -------------


def _shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    local = full.shape[-1] // world
    return full[..., rank * local : (rank + 1) * local].contiguous()


class _CollectiveSpy:
    """Counts all-reduces (and their sizes) and forbids anything that could gather the vocab."""

    def __init__(self):
        self.calls = []
        self._all_reduce = dist.all_reduce

    def __enter__(self):
        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append((str(op), tensor.numel()))
            return self._all_reduce(tensor, op=op, group=group, async_op=async_op)

        def forbidden(*args, **kwargs):
            raise AssertionError("the vocabulary must never be gathered")

        self._saved = {name: getattr(dist, name) for name in ("all_gather", "all_gather_into_tensor", "broadcast")}
        dist.all_reduce = all_reduce
        for name in self._saved:
            setattr(dist, name, forbidden)
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._all_reduce
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _tp_worker(rank, world):
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(100)  # the same full tensors on every rank
    local = 16
    cases = [
        dict(dtype=torch.float32, temperature=1.0, vocab_size=None, chunk_size=None, offset=0.0),
        dict(dtype=torch.float32, temperature=0.6, vocab_size=local * world - 5, chunk_size=4, offset=0.0),
        dict(dtype=torch.bfloat16, temperature=1.3, vocab_size=None, chunk_size=3, offset=0.0),
        dict(dtype=torch.float32, temperature=1.0, vocab_size=None, chunk_size=None, offset=-1e4),
        dict(dtype=torch.float32, temperature=1.0, vocab_size=None, chunk_size=7, offset=1e4),
    ]
    if world == 4:  # the last rank holds only padding
        cases.append(dict(dtype=torch.float32, temperature=0.9, vocab_size=3 * local - 2,
                          chunk_size=None, offset=0.0))
    for case in cases:
        vocab = case["vocab_size"] or local * world
        full = (torch.randn(2, 9, local * world, generator=gen) * 3 + case["offset"]).to(case["dtype"])
        full[1, 8, : vocab // 3] = -math.inf
        labels = torch.randint(0, vocab, (2, 9), generator=gen)
        # labels owned by every rank that holds real tokens (first and last column of each shard)
        labels[0, : world] = torch.minimum(torch.arange(world) * local, torch.tensor(vocab - 1))
        labels[1, : world] = torch.minimum(torch.arange(1, world + 1) * local - 1, torch.tensor(vocab - 1))
        labels[1, 8] = vocab - 1  # off the -inf entries of that row
        z = _shard(full, rank, world).requires_grad_()
        with _CollectiveSpy() as spy:
            logp, entropy = op(z, labels, temperature=case["temperature"], tp_group=group,
                               vocab_size=case["vocab_size"], chunk_size=case["chunk_size"],
                               entropy_grad=True)
        n = labels.numel()
        if world > 1:  # two collectives per call, O(tokens) floats each
            assert spy.calls == [(str(dist.ReduceOp.MAX), n), (str(dist.ReduceOp.SUM), 3 * n)], spy.calls
        z_ref = full.double().requires_grad_()
        logp_ref, entropy_ref = reference_logprobs_entropy(
            z_ref, labels, temperature=case["temperature"], vocab_size=case["vocab_size"])
        assert rel_err(logp, logp_ref) < FP32_TOL, case
        assert rel_err(entropy, entropy_ref) < FP32_TOL, case
        g = torch.Generator().manual_seed(7)
        g_lp = torch.randn(2, 9, generator=g, dtype=torch.float64)
        g_h = torch.randn(2, 9, generator=g, dtype=torch.float64)
        (logp * g_lp.float() + entropy * g_h.float()).sum().backward()
        (logp_ref * g_lp + entropy_ref * g_h).sum().backward()
        grad_tol = BF16_GRAD_TOL if case["dtype"] == torch.bfloat16 else FP32_TOL
        expected = _shard(z_ref.grad, rank, world)
        assert rel_err(z.grad, expected) < grad_tol or expected.norm() == 0 and z.grad.norm() == 0, case

    # A NaN on one rank's shard: every rank raises, none is left waiting in a collective.
    bad = torch.randn(3, local)
    if rank == world - 1:
        bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        op(bad, torch.tensor([0, 1, 2]), tp_group=group)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tensor_parallel_matches_full_vocab(world):
    run_distributed(_tp_worker, world)
