"""fused_lm_head_logprobs_and_entropy against a float64 full-vocabulary reference (docs/numerics.md §1).

The reference materialises hidden.double() @ weight.double().T over the real vocabulary and takes
its log-softmax (tests/ops/reference.py); nothing here reuses the code under test. -inf logit
entries, tested for vocab_parallel, cannot be expressed through finite hidden states and weights:
the only excluded columns are vocabulary padding (covered here), and non-finite inputs are errors.
"""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_archer.distributed import rank_and_size
from megatron_archer.ops import fused_lm_head_logprobs_and_entropy as op
from tests.distributed import run_distributed
from tests.numerics import assert_as_accurate
from tests.ops.reference import reference_logprobs_entropy, rel_err

# Norm-wise relative error of float32 results against float64 (the inputs are the same float32
# values, so only the op's arithmetic counts). Per token the op forms logits over a hidden size
# of 16-40, takes a running max (exact), subtracts it (exact: Sterbenz, or an error of eps |z|),
# sums V exps (relative error below ~sqrt(V) eps for random terms, V <= 1000 here) and takes a
# log; the results' error is a few eps times |z|max / |result| ~ 2-10 for these cases, i.e.
# ~1e-6. 1e-5 (~84 eps) bounds that with room for the worst summation order, and a wrong formula
# is off by far more.
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
    z = h @ w[:vocab_size].T
    logp, entropy = reference_logprobs_entropy(z, labels, temperature=temperature)
    return logp, entropy, h, w


def _upstream(shape, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))


def _tolerances(dtype):
    """(values, gradients): values are fp32 (fp64) whatever the inputs; gradients come back in
    the inputs' dtype, so half-precision ones are within its unit roundoff eps / 2 per entry."""
    if dtype == torch.float64:
        return FP64_TOL, FP64_TOL
    if dtype in (torch.bfloat16, torch.float16):
        return FP32_TOL, torch.finfo(dtype).eps / 2 + FP32_TOL
    return FP32_TOL, FP32_TOL


LOCAL_VOCAB = 11
CASES = [  # (dtype, temperature, padding, chunk_size, vocab_chunk_size, offset, entropy_grad)
    (torch.float32, 1.0, 0, None, None, 0.0, True),
    (torch.float32, 0.6, 5, 3, 4, 0.0, True),
    (torch.float32, 1.3, 5, 4, 3, 0.0, False),
    (torch.float32, 0.7, 0, 4, 5, 1e4, True),
    (torch.float32, 1.0, 3, None, 8, -1e4, True),  # a running max started at 0 fails this one
    (torch.bfloat16, 1.3, 5, 3, 4, 0.0, True),
    (torch.float16, 0.8, 2, 4, 3, 0.0, True),
    (torch.float64, 0.9, 2, 2, 3, 0.0, True),
]


def _check(group, case, seed, *, local_vocab=LOCAL_VOCAB, lead=(3, 6), hidden_size=16,
           implementation="auto", label_stride=None):
    """One case on one tensor-parallel group (None: one process): this rank's outputs and
    gradients vs float64. Returns (logp, entropy, d_hidden, d_weight) and their float64
    references.

    The weight's padding rows are NaN (they must take no part); labels are placed at the first
    column of every vocabulary tile (or every ``label_stride`` columns) of every rank that holds
    real tokens, as far as there are tokens.
    """
    dtype, temperature, padding, chunk, vchunk, offset, entropy_grad = case
    rank, world = rank_and_size(group)
    vocab = local_vocab * world - padding
    hidden, weight = _make_case(seed, lead, hidden_size, local_vocab * world, dtype=dtype,
                                offset=offset)
    weight[vocab:] = math.nan
    labels = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(seed))
    tile_starts = torch.arange(0, local_vocab, label_stride or vchunk or local_vocab)
    owned = (torch.arange(world)[:, None] * local_vocab + tile_starts).flatten()
    owned = owned[owned < vocab][: labels.numel()]
    labels.view(-1)[: len(owned)] = owned
    start = rank * local_vocab
    if start < vocab:
        assert ((labels >= start) & (labels < start + local_vocab)).any()

    h = hidden.clone().requires_grad_()
    w = weight[start : start + local_vocab].clone().requires_grad_()
    logp, entropy = op(h, w, labels, temperature=temperature, tp_group=group, vocab_size=vocab,
                       chunk_size=chunk, vocab_chunk_size=vchunk, entropy_grad=entropy_grad,
                       implementation=implementation)
    logp_ref, entropy_ref, h_ref, w_ref = _reference(hidden, weight, labels, temperature, vocab)
    g_lp, g_h = _upstream(labels.shape)
    loss = (logp * g_lp.to(logp.dtype)).sum()
    loss_ref = (logp_ref * g_lp).sum()
    if entropy_grad:
        loss = loss + (entropy * g_h.to(logp.dtype)).sum()
        loss_ref = loss_ref + (entropy_ref * g_h).sum()
    else:
        assert not entropy.requires_grad
    loss.backward()
    loss_ref.backward()

    val_tol, grad_tol = _tolerances(dtype)
    assert logp.shape == entropy.shape == labels.shape
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert h.grad.dtype == w.grad.dtype == dtype
    assert rel_err(logp, logp_ref) < val_tol and rel_err(entropy, entropy_ref) < val_tol
    assert rel_err(h.grad, h_ref.grad) < grad_tol  # d_hidden: all-reduced over the group
    w_ref_grad = w_ref.grad[start : start + local_vocab]
    if w_ref_grad.norm() == 0:  # a rank of pure padding
        assert torch.all(w.grad == 0)
    else:
        assert rel_err(w.grad, w_ref_grad) < grad_tol
    assert torch.all(w.grad[max(vocab - start, 0) :] == 0)
    return (logp, entropy, h.grad, w.grad), (logp_ref, entropy_ref, h_ref.grad, w_ref_grad)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_grads(case):
    """One process: T != 1, padded vocab (NaN padding rows), |z| ~ 1e4, half precision, tiles
    that divide neither the tokens nor the vocabulary."""
    _check(None, case, seed=3)


def test_chunked_equals_unchunked():
    results = [
        _check(None, (torch.bfloat16, 0.7, 4, c, v, 0.0, True), seed=5, local_vocab=30, lead=(13,),
               label_stride=3)
        for c, v in [(None, None), (1, 1), (4, 7), (13, 30), (100, 1000)]
    ]
    (base, reference), names = results[0], ("logp", "entropy", "d_hidden", "d_weight")
    for result, _ in results[1:]:  # every tiling as accurate as the untiled op (tests/numerics.py)
        for name, got, expected, want in zip(names, result, base, reference):
            assert_as_accurate(got, expected, want, name)


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


def _tp_worker(rank, world_size):
    """TP 1, 2 and 4 in one spawn: the 4 ranks form 4 groups of 1, 2 groups of 2, 1 group of 4."""
    for tp in (1, 2, 4):
        group, _ = dist.new_subgroups(group_size=tp)
        cases = CASES + [(torch.float32, 0.8, LOCAL_VOCAB + 2, 4, 5, 0.0, True)] * (tp > 1)
        for seed, case in enumerate(cases):  # the last one: the last rank holds only padding
            try:
                _check(group, case, seed)
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


# --- the Triton kernels, run on CPU by Triton's interpreter in a fresh process ---------------

TRITON_CASES = [  # as CASES; blocks of 16 divide neither 21 tokens, 37 columns nor H = 40.
    # The kernel's vocabulary splits are vocab_chunk_size rounded up to 16 columns: 32 gives
    # splits of two tiles (the online rescaling inside a program), 16 three splits of one.
    (torch.float32, 0.7, 5, 8, 32, 0.0, True),
    (torch.float32, 1.0, 0, None, 16, -1e4, True),  # all logits very negative
    (torch.float32, 1.6, 2, 5, 20, 1e4, False),
    (torch.float16, 1.3, 5, 8, 16, 0.0, True),  # (the 3.9 interpreter's bf16 tl.dot is broken)
]


class _CountingKernel:
    """Stands in for a Triton kernel and counts its launches (proof the forced path ran) and the
    dtypes of its first operand, the hidden states."""

    def __init__(self, kernel):
        self.kernel, self.launches, self.operand_dtypes = kernel, 0, set()

    def __getattr__(self, name):  # the autotuner's configs
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        self.launches += 1
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.operand_dtypes.add(args[0].dtype)
            return launch(*args, **kwargs)

        return run


def _time_once(kernel_call, quantiles):
    """The autotuner's benchmark on CPU: one timed run."""
    start = time.perf_counter()
    kernel_call()
    return [time.perf_counter() - start] * len(quantiles)


def _triton_worker(rank, world_size):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton

    from megatron_archer.ops import triton_lm_head

    names = ("_stats_kernel", "_grad_kernel")
    tuners = {name: getattr(triton_lm_head, name) for name in names}
    # The interpreter gets the first config alone: nothing to time without a GPU.
    assert all(tuner.configs == triton_lm_head.CONFIGS[:1] for tuner in tuners.values())
    # Blocks of 16 (several tiles per program and per split) in two shapes, timed on CPU, so the
    # autotuner benchmarks both and runs the one it picks, once per key.
    small = [triton.Config({"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_K": 16}),
             triton.Config({"BLOCK_N": 32, "BLOCK_V": 16, "BLOCK_K": 32})]
    for tuner in tuners.values():
        tuner.configs, tuner.do_bench = small, _time_once
    kernels = {name: _CountingKernel(tuner) for name, tuner in tuners.items()}
    for name, kernel in kernels.items():
        setattr(triton_lm_head, name, kernel)
    shape = dict(local_vocab=37, lead=(3, 7), hidden_size=40)
    groups = {tp: dist.new_subgroups(group_size=tp)[0] for tp in (1, 2)}
    for tp, group in groups.items():
        for seed, case in enumerate(TRITON_CASES):
            try:
                fused = _check(group, case, seed, implementation="triton", **shape)
                tiled = _check(group, case, seed, implementation="torch", **shape)
            except AssertionError as error:
                raise AssertionError(f"tp={tp} case={case}") from error
            tol = _tolerances(case[0])[1]
            for got, expected in zip(fused[0], tiled[0]):
                assert rel_err(got, expected) < tol, (tp, case)
    assert all(kernel.launches > 0 for kernel in kernels.values()), kernels
    # half-precision hidden states reach both kernels as they are (tensor-core dots), never
    # upcast to fp32 (which selects IEEE fp32 dots)
    for kernel in kernels.values():
        assert kernel.operand_dtypes == {torch.float32, torch.float16}, kernel.operand_dtypes
    # tuned per key (fp32 and fp16 at least), each time picking one of the configs
    for tuner in tuners.values():
        assert len(tuner.cache) > 1 and set(tuner.cache.values()) <= set(small), tuner.cache
    # Every production tile shape, each alone (a single config runs untimed), at TP 1.
    for config in triton_lm_head.CONFIGS:
        for tuner in tuners.values():
            tuner.configs = [config]
        for seed, case in enumerate(TRITON_CASES):
            try:
                _check(groups[1], case, seed, implementation="triton", **shape)
            except AssertionError as error:
                raise AssertionError(f"config={config} case={case}") from error
    # the Triton path synchronises the host no more often for more tiles either
    assert _host_syncs(12, 40, "triton") == _host_syncs(3, 7, "triton")


def _triton_interpreter_main():
    run_distributed(_triton_worker, 2)


def test_triton_kernels_under_interpreter():
    """TP 1 and 2 with implementation="triton" on CPU tensors, vs float64 and the torch path."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    code = "from tests.ops.test_fused_lm_head import _triton_interpreter_main as m; m()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs it")
def test_forced_triton_never_falls_back():
    hidden, weight, labels = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 4, 1])
    with pytest.raises(RuntimeError, match="triton"):
        op(hidden, weight, labels, implementation="triton")


class _HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that make the host wait for the device on CUDA: ``nonzero``, a boolean
    index, ``item``/``tolist``, a tensor's truth value."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
        if name in ("nonzero", "item", "tolist", "__bool__") or boolean_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_syncs(chunk, vocab_chunk, implementation="auto"):
    """The host syncs of one forward and backward of 12 tokens x 40 columns in the given tiles."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 40, (12,), generator=g)
    with _HostSyncs() as mode:
        logp, entropy = op(hidden, weight, labels, chunk_size=chunk, vocab_chunk_size=vocab_chunk,
                           entropy_grad=True, implementation=implementation)
        (logp.sum() + entropy.sum()).backward()
    return mode.count


def test_no_host_sync_per_tile():
    """Issue 24 (Triton review): finding each tile's labels by boolean indexing synchronised the
    host once per (token chunk, vocabulary chunk). The syncs must not grow with the tile count:
    the same call with 1 and with 24 tiles makes the same number (the Triton path: in the
    interpreter test)."""
    assert _host_syncs(12, 40) == _host_syncs(3, 7)  # 1 tile, 4 x 6 tiles
