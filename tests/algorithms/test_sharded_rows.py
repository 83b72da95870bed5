"""Per-response statistics over the ranks of a context-parallel group (docs/numerics.md §9), with real gloo
processes: every rank holds disjoint tokens of the same responses (values elsewhere are NaN, so
any leak shows), and the results equal the unsplit computation bitwise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_archer.algorithms import (
    ArcherConfig,
    ForkingConfig,
    LossConfig,
    SelectionConfig,
    build_step_context,
)
from megatron_archer.algorithms.order_stats import row_quantile
from megatron_archer.algorithms.sharded_rows import (
    check_together,
    key_values,
    order_keys,
    sharded_row_quantile,
    sharded_row_sums,
    sharded_rows,
)
from megatron_archer.algorithms.token_selection import select_tokens
from megatron_archer.algorithms.validation import require_token_tensor
from megatron_archer.nonfinite import NonFiniteError
from tests.cuda_guard import FAKE_DEVICE, fake_cuda
from tests.distributed import run_distributed

QUANTILES = (0.0, 0.2, 0.37, 0.5, 0.8, 1.0)


def nasty_rows(seed: int, dtype: torch.dtype, rows: int = 12, width: int = 23):
    """[rows, width] values with ties, zeros of both signs, negatives, values one ulp apart and
    a huge range; lengths include 0, 1 and 2 tokens; NaN outside the mask."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, width, generator=gen, dtype=torch.float64).to(dtype)
    values[torch.rand(rows, width, generator=gen) < 0.3] = 0.5  # ties within a row
    values[1] = 0.0
    values[1, ::2] = -0.0
    values[2] = -values[2] * 1e30
    base = torch.tensor(0.672, dtype=dtype)
    values[3] = base + torch.arange(width, dtype=dtype) % 5 * torch.finfo(dtype).eps
    values[4] = torch.tensor(torch.finfo(dtype).tiny, dtype=dtype) * torch.arange(width, dtype=dtype)
    lengths = torch.randint(3, width + 1, (rows,), generator=gen)
    lengths[5], lengths[6], lengths[7] = 0, 1, 2
    lengths[1] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    values[~mask] = float("nan")
    return values, mask


def ownership(mask: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """[rows, width] CP rank of each token: random per token, row 8 all on the last rank and row 9
    in contiguous chunks (as the CP layout cuts a response)."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, size, mask.shape, generator=gen)
    owner[8] = size - 1
    owner[9] = torch.arange(mask.shape[1]) * size // mask.shape[1]
    return owner


def local_view(values, mask, owner, rank):
    """This rank's tokens; NaN at the others' positions."""
    mine = mask & (owner == rank)
    return torch.where(mine, values, torch.full_like(values, float("nan"))), mine


def test_order_keys_order_and_invert_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        values, mask = nasty_rows(1, dtype)
        flat = values[mask]
        keys = order_keys(flat)
        assert torch.equal(key_values(keys, dtype), flat + 0.0)
        order = torch.argsort(keys, stable=True)
        assert torch.all(flat[order][1:] >= flat[order][:-1])
        assert order_keys(torch.tensor([-0.0, 0.0], dtype=dtype)).unique().numel() == 1
    with pytest.raises(ValueError, match="float32 or float64"):
        order_keys(torch.zeros(2, dtype=torch.bfloat16))


def test_without_a_group_the_unsplit_functions_are_used():
    values, mask = nasty_rows(2, torch.float64)
    assert torch.equal(sharded_row_quantile(values, mask, 0.8).nan_to_num(-1),
                       row_quantile(values, mask, 0.8).nan_to_num(-1))
    assert torch.equal(sharded_rows(values, mask)[1], mask)
    assert torch.equal(sharded_row_sums(mask.double()), mask.double().sum(-1))


class _CountingAllReduce:
    """Records the element count of every all-reduce."""

    def __init__(self):
        self.sizes = []
        self._real = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.sizes.append(tensor.numel())
        return self._real(tensor, *args, **kwargs)


def _quantile_worker(rank, size):
    group = dist.group.WORLD
    for seed, dtype in [(10, torch.float64), (11, torch.float32), (12, torch.float64)]:
        values, mask = nasty_rows(seed, dtype)
        owner = ownership(mask, size, seed)
        local, mine = local_view(values, mask, owner, rank)
        nan_masked = torch.where(mask, values, torch.full_like(values, float("nan")))
        for q in QUANTILES:
            counter = _CountingAllReduce()
            dist.all_reduce = counter
            try:
                got = sharded_row_quantile(local, mine, q, group)
            finally:
                dist.all_reduce = counter._real
            want = torch.nanquantile(nan_masked, q, dim=-1)
            assert torch.equal(got.nan_to_num(-7.0), want.nan_to_num(-7.0)), (dtype, q, got, want)
            assert torch.equal(got.isnan(), mask.sum(-1) == 0)
            bits = 32 if dtype == torch.float32 else 64
            # O(rows) per collective, never O(tokens): counts, bisection steps, the next value
            assert set(counter.sizes) == {mask.shape[0]} and len(counter.sizes) == bits + 3

    # class masks and soft ramps of the whole responses (archer, archer_soft, micro-batch top-k)
    values, mask = nasty_rows(13, torch.float64)
    values = torch.where(mask, values.abs(), values)  # entropies are >= 0
    owner = ownership(mask, size, 13)
    local, mine = local_view(values, mask, owner, rank)
    loss = LossConfig()
    for selection in (SelectionConfig("archer"),
                      SelectionConfig("archer", archer=ArcherConfig(quantile=0.5)),
                      SelectionConfig("archer_soft"),
                      SelectionConfig("archer_soft", archer=ArcherConfig(quantile=0.6, soft_width=0.3)),
                      SelectionConfig("forking", forking=ForkingConfig(rho=0.3, scope="micro_batch")),
                      SelectionConfig("forking", forking=ForkingConfig(rho=0.2, scope="micro_batch",
                                                                       keep="bottom"))):
        want = select_tokens(torch.where(mask, values, 0.0), mask, selection, loss)
        got = select_tokens(local, mine, selection, loss, cp_group=group)
        for name in ("pg_weight", "high_share", "eps_low", "eps_high", "kl_coef"):
            expected = torch.where(mine, getattr(want, name), torch.zeros(()))
            assert torch.equal(getattr(got, name), expected), (selection, name)
        assert torch.equal(got.token_class, torch.where(mine, want.token_class, -1)), selection
    full, full_mask = sharded_rows(local, mine, group)
    assert torch.equal(full_mask, mask) and torch.equal(full[mask], values[mask])
    assert torch.equal(sharded_row_sums(mine.double(), group), mask.double().sum(-1))

    # overlapping ownership is refused on every rank
    with pytest.raises(ValueError, match="hold the same token"):
        sharded_rows(values, mask, group)

    # a bad input on one rank raises on every rank, naming the tensor, before any collective
    bad = local.clone()
    if rank == 0:
        bad[tuple(mine.nonzero()[0].tolist())] = math.inf
    with pytest.raises(NonFiniteError, match="entropy") as caught:
        select_tokens(bad, mine, SelectionConfig("archer"), loss, cp_group=group)
    assert caught.value.tensor == "entropy"
    with pytest.raises(ValueError, match="another rank" if rank else "must have the response"):
        check_together(lambda: require_token_tensor("logp", local[:, :3] if rank == 0 else local, mine),
                       group)
    check_together(lambda: None, group)  # still in step
    with pytest.raises(ValueError, match="not a multiple of cp_group's"):
        build_step_context([(local, mine)], SelectionConfig("archer"), None, group)

    # on CUDA tensors (a CPU stand-in enforcing distributed.py's device rule): the same results
    selections = (SelectionConfig("archer"), SelectionConfig("archer_soft"),
                  SelectionConfig("forking", forking=ForkingConfig(rho=0.3, scope="micro_batch")))
    plain = [select_tokens(local, mine, selection, loss, cp_group=group).high_share
             for selection in selections]
    with fake_cuda():
        on_device = local.to(FAKE_DEVICE), mine.to(FAKE_DEVICE)
        quantile = sharded_row_quantile(*on_device, 0.8, group)
        assert quantile.device == FAKE_DEVICE
        assert torch.equal(quantile.cpu().nan_to_num(-7.0),
                           sharded_row_quantile(local, mine, 0.8, group).nan_to_num(-7.0))
        for selection, want in zip(selections, plain):
            got = select_tokens(*on_device, selection, loss, cp_group=group).high_share
            assert torch.equal(got.cpu(), want), selection


@pytest.mark.parametrize("size", [2, 3])
def test_sharded_quantile_and_classes_equal_the_unsplit_rows(size):
    run_distributed(_quantile_worker, size)
