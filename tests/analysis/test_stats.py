"""Each entropy statistic (docs/numerics.md §6) against a direct computation on random inputs, with ties
and empty inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_archer.analysis import stats


def _entropies(n: int, seed: int, tied: bool) -> np.ndarray:
    """Roughly half near-zero entropies and a long tail, as in the papers; ``tied`` rounds them
    to two decimals so many values repeat."""
    rng = np.random.default_rng(seed)
    values = np.where(rng.random(n) < 0.5, rng.random(n) * 0.02, rng.exponential(1.0, n))
    return (np.round(values, 2) if tied else values).astype(np.float32)


@pytest.mark.parametrize("n, tied", [(1, False), (7, True), (1000, False), (1000, True)])
def test_distribution_summary(n, tied):
    x = _entropies(n, seed=n, tied=tied)
    got = stats.distribution_summary(x, percentiles=(0.5, 0.8, 0.99))
    ordered = sorted(float(v) for v in x)
    assert got["count"] == n
    assert got["mean"] == pytest.approx(float(np.mean(x.astype(np.float64))), rel=1e-9)
    low = float(np.float32(0.01))  # compared in float32, as the training metric
    assert got["share_below_0.01"] == sum(v < low for v in ordered) / n
    for p in (0.5, 0.8, 0.99):  # nearest rank: the ceil(p n)-th smallest value
        assert got[f"p{100 * p:g}"] == ordered[math.ceil(p * n) - 1]
    assert got["share_above_p80"] == sum(v > got["p80"] for v in ordered) / n


def test_distribution_summary_empty():
    assert stats.distribution_summary(np.zeros(0, dtype=np.float32)) == {"count": 0}


@pytest.mark.parametrize("min_count", [1, 5, 40])
def test_token_entropy_table(min_count):
    rng = np.random.default_rng(min_count)
    ids = rng.integers(0, 30, 600)
    x = _entropies(600, seed=1, tied=True)
    x[ids == 3] = 0.5  # tokens 3 and 4 share their mean: ties go to the smaller id
    x[ids == 4] = 0.5
    highest, lowest = stats.token_entropy_table(ids, x, min_count=min_count, top=8)
    seen: dict[int, list[float]] = {}
    for token, value in zip(ids.tolist(), x.tolist()):
        seen.setdefault(token, []).append(value)
    direct = [(t, len(v), sum(v) / len(v)) for t, v in seen.items() if len(v) >= min_count]
    want_high = sorted(direct, key=lambda r: (-r[2], r[0]))[:8]
    want_low = sorted(direct, key=lambda r: (r[2], r[0]))[:8]
    for got, want in ((highest, want_high), (lowest, want_low)):
        assert [(s.token_id, s.count) for s in got] == [(t, c) for t, c, _ in want]
        assert [s.mean_entropy for s in got] == pytest.approx([m for _, _, m in want], rel=1e-12)
    assert stats.token_entropy_table(np.zeros(0), np.zeros(0)) == ([], [])
    assert stats.token_entropy_table(ids, x, min_count=10_000) == ([], [])


def _direct_top(x: np.ndarray, rho: float) -> set[int]:
    k = min(len(x), max(1, math.ceil(rho * len(x) - 1e-9)))
    return set(sorted(range(len(x)), key=lambda i: (-float(x[i]), i))[:k])


@pytest.mark.parametrize("n, tied", [(1, False), (9, True), (500, False), (500, True)])
def test_top_overlap(n, tied):
    before = _entropies(n, seed=n, tied=tied)
    after = _entropies(n, seed=n + 1, tied=tied)
    assert stats.top_overlap(before, before) == 1.0
    a, b = _direct_top(before, 0.2), _direct_top(after, 0.2)
    assert stats.top_overlap(before, after) == len(a & b) / len(a)
    assert set(np.flatnonzero(stats.top_positions(before, 0.2))) == a
    if n >= 500:  # a random permutation keeps about rho of the positions
        permuted = np.random.default_rng(0).permutation(before)
        assert stats.top_overlap(before, permuted) < 0.5


def test_top_overlap_edges():
    assert math.isnan(stats.top_overlap(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="differ in length"):
        stats.top_overlap(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("n, tied", [(0, False), (7, True), (20, False), (997, True)])
def test_binned_change(n, tied):
    before = _entropies(n, seed=n, tied=tied)
    after = before + np.random.default_rng(n).normal(0, 0.1, n).astype(np.float32)
    got = stats.binned_change(before, after)
    order = sorted(range(n), key=lambda i: (float(before[i]), i))  # ascending, ties by position
    for b in range(20):  # bin b holds ranks [ceil(b n / 20), ceil((b + 1) n / 20))
        members = order[math.ceil(b * n / 20): math.ceil((b + 1) * n / 20)]
        if not members:
            assert math.isnan(got[b])
        else:
            want = sum(float(after[i]) - float(before[i]) for i in members) / len(members)
            assert got[b] == pytest.approx(want, rel=1e-9, abs=1e-12)
    same = stats.binned_change(before, before)
    assert np.all((same == 0) | np.isnan(same))
