"""Order statistics: top-k counts, per-response quantile and rank, exact k-th largest."""

import math

import numpy as np
import pytest
import torch

from megatron_archer.algorithms.order_stats import (
    kth_largest,
    row_quantile,
    row_rank_fraction,
    top_count,
)


@pytest.mark.parametrize("rho, n, k", [
    (0.2, 10, 2), (0.1, 10, 1), (0.7, 10, 7), (0.3, 10, 3), (0.2, 11, 3), (1.0, 7, 7),
    (1e-9, 5, 1), (0.5, 1, 1), (0.2, 0, 0), (0.999, 1000, 999), (0.2, 10**9, 2 * 10**8),
])
def test_top_count_is_ceil_rho_n(rho, n, k):
    assert top_count(rho, n) == k


def _random_rows(seed, rows=6, width=9):
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, width, generator=gen, dtype=torch.float64)
    values[1, :4] = 0.25  # ties
    lengths = torch.tensor([9, 4, 1, 0, 5, 7])
    mask = torch.arange(width)[None, :] < lengths[:, None]
    values[~mask] = -5.0  # padding must not matter
    return values, mask


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_row_quantile_matches_numpy_linear(q):
    values, mask = _random_rows(2)
    got = row_quantile(values, mask, q)
    for i in range(values.shape[0]):
        valid = values[i][mask[i]].numpy()
        if valid.size == 0:
            assert math.isnan(got[i].item())
        else:
            assert got[i].item() == pytest.approx(np.quantile(valid, q), abs=1e-15)


def test_row_rank_fraction_is_mid_rank_over_n_minus_1():
    values, mask = _random_rows(3)
    got = row_rank_fraction(values, mask)
    for i in range(values.shape[0]):
        valid = values[i][mask[i]].tolist()
        n = len(valid)
        for t, v in enumerate(valid):
            less = sum(x < v for x in valid)
            equal = sum(x == v for x in valid)
            want = (less + (equal - 1) / 2) / max(n - 1, 1)
            assert got[i, t].item() == pytest.approx(want, abs=1e-15)
    assert torch.all(got[~mask] == 0)


def test_kth_largest_single_process_with_ties_negatives_and_zeros():
    gen = torch.Generator().manual_seed(4)
    values = [torch.randint(-3, 4, (50,), generator=gen).float() / 4,
              torch.randn(31, generator=gen), torch.tensor([0.0, -0.0, 0.0]), torch.zeros(0)]
    flat = np.sort(np.concatenate([v.numpy() for v in values]))[::-1]
    ks = [1, 2, 7, 40, 83, 84, 0]
    got = kth_largest(values, ks)
    for k, value in zip(ks, got):
        assert value == (math.inf if k == 0 else flat[k - 1])
    with pytest.raises(ValueError, match="exceeds"):
        kth_largest(values, [85])


def test_kth_largest_is_exact_in_float32_for_close_values():
    base = torch.tensor(0.672, dtype=torch.float32)
    values = [base + torch.arange(-3, 4, dtype=torch.float32) * torch.finfo(torch.float32).eps]
    got = kth_largest(values, [1, 4, 7])
    flat = np.sort(values[0].numpy())[::-1]
    assert got == [float(flat[0]), float(flat[3]), float(flat[6])]


def test_rows_without_any_column_give_nan_and_zero():
    """A micro-batch whose responses are all empty has a [B, 0] layout."""
    values, mask = torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool)
    assert torch.isnan(row_quantile(values, mask, 0.8)).all() and row_quantile(values, mask, 0.8).shape == (3,)
    assert row_rank_fraction(values, mask).shape == (3, 0)
