"""Triton kernels for ``fused_lm_head``: logits tiles computed and reduced on chip (docs/numerics.md §1).

The same semantics as the torch tiles in ``fused_lm_head``, in the representation of
``softmax_stats``: m is the running max of the raw logits z, and with x = (z - m) / T,
s = sum exp(x), b = sum exp(x) * x, rescaled by alpha = exp((m_old - m_new) / T) as a new tile
raises the max. The running max starts at -inf, not 0: starting at 0 underflows s to 0 when every
logit is very negative.

- ``local_stats``: grid (token blocks, vocabulary splits); each program walks its split in
  BLOCK_V columns, each logits tile a tl.dot over BLOCK_K slices of H with fp32 accumulation,
  and writes partial (m, s, b, z_y) per (token, split); ``softmax_stats.reduce_over_dim``
  combines the splits. Memory: 4 floats per (token, split).
- ``logits_grad``: for one (token chunk, vocabulary chunk) recomputes the tile and writes
  G = dL/dz in fp32 with the formula of ``softmax_stats.logits_grad_``; the caller does the
  matmuls into d_hidden and d_weight.

Tile shapes are autotuned (``CONFIGS``), keyed on the hidden size, the vocabulary extent, the
dtypes and the token count rounded up to a power of two (so variable packed lengths re-tune a
handful of times, not once per length); the choice can differ between runs, and with it the
rounding of the fp32 accumulation (never the formula). Under ``TRITON_INTERPRET=1`` there is no
GPU to time: the first config alone runs. The host never waits for the device inside these
functions: grids, splits and keys come from shapes, labels are located elementwise.

This module imports triton; ``fused_lm_head`` imports it only when the Triton path is used.
fp32 inputs use IEEE fp32 dots (no TF32), so results match the torch path to fp32 rounding;
bf16/fp16 inputs are loaded as they are (tensor-core dots, fp32 accumulation), in forward and in
backward. Every pointer offset is computed in int64.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatron_archer.ops import softmax_stats
from megatron_archer.ops.vocab_shard import VocabShard


def _tiles(block_n, block_v, block_k, num_warps, num_stages=3):
    """One autotuning config: the three block sizes and the launch shape."""
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k},
                         num_warps=num_warps, num_stages=num_stages)


# The tile shapes the autotuner times (tl.dot needs each >= 16): the former fixed 64x64x32, and
# wider tiles that re-read each hidden-state tile for fewer vocabulary tiles. A shape that does
# not fit a GPU's shared memory (Triton's OutOfResources) is timed as infinite, never chosen.
CONFIGS = [
    _tiles(64, 64, 32, num_warps=4),
    _tiles(64, 128, 32, num_warps=4),
    _tiles(128, 64, 32, num_warps=4),
    _tiles(128, 128, 32, num_warps=8),
    _tiles(128, 128, 64, num_warps=8),
]


def _autotune(key):
    """``triton.autotune`` over ``CONFIGS`` by ``key``; under the interpreter the first config only
    (a single config is never benchmarked, and there is no GPU to time the others on)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return triton.autotune(configs=CONFIGS[:1] if interpreting else CONFIGS, key=key)


def _n_bucket(n: int) -> int:
    """The autotuning key for a token count: the next power of two."""
    return triton.next_power_of_2(n)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, k, stride_hn, stride_hk, stride_wv,
                 stride_wk, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Raw logits z[rows, cols] = h[rows] @ w[cols].T, fp32 accumulation; 0 where masked."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    rows = rows.to(tl.int64)  # V x H can pass 2^31 elements
    cols = cols.to(tl.int64)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wk,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w.to(h.dtype)), acc, input_precision=PRECISION)
    return acc


@_autotune(key=["n_bucket", "k", "valid", "split"])
@triton.jit
def _stats_kernel(h_ptr, w_ptr, label_ptr, out_ptr, n, k, valid, split, temperature, n_bucket,
                  stride_hn, stride_hk, stride_wv, stride_wk,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Partial (m, s, b, z_y) of a token block over a vocabulary split, into out[4, n, splits]
    (every entry written, so the autotuner may run it once per config)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)  # local column, -1: not this rank's
    v_lo = pid_s * split
    v_hi = tl.minimum(v_lo + split, valid)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # -inf, never 0 (all-negative logits)
    s = tl.zeros([BLOCK_N], tl.float32)
    b = tl.zeros([BLOCK_N], tl.float32)
    z_y = tl.zeros([BLOCK_N], tl.float32)
    n_bad = tl.zeros([BLOCK_N], tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, k, stride_hn, stride_hk,
                         stride_wv, stride_wk, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
        real = row_ok[:, None] & col_ok[None, :]
        # A -inf, +inf or NaN logit means non-finite inputs (or overflow): flag the token.
        n_bad += tl.sum((real & ((z != z) | (tl.abs(z) == float("inf")))).to(tl.int32), axis=1)
        z_y += tl.sum(tl.where((cols[None, :] == label[:, None]) & real, z, 0.0), axis=1)
        z = tl.where(col_ok[None, :], z, float("-inf"))

        new_m = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # no -inf - -inf
        x = (z - shift[:, None]) / temperature
        e = tl.exp(x)
        tile_b = tl.sum(tl.where(e > 0.0, e * x, 0.0), axis=1)  # 0 * log 0 = 0
        d = tl.where(s == 0.0, 0.0, (m - new_m) / temperature)  # an empty running slice: no-op
        alpha = tl.exp(d)
        b = alpha * (b + d * s) + tile_b
        s = alpha * s + tl.sum(e, axis=1)
        m = new_m

    s = tl.where(n_bad > 0, float("nan"), s)
    at = rows.to(tl.int64) * n_splits + pid_s  # int64 offsets: 4 x tokens x splits can pass 2^31
    plane = n_splits.to(tl.int64) * n
    tl.store(out_ptr + at, m, mask=row_ok)
    tl.store(out_ptr + plane + at, s, mask=row_ok)
    tl.store(out_ptr + 2 * plane + at, b, mask=row_ok)
    tl.store(out_ptr + 3 * plane + at, z_y, mask=row_ok)


@_autotune(key=["n_bucket", "k", "vc", "HAS_ENTROPY_GRAD"])
@triton.jit
def _grad_kernel(h_ptr, w_ptr, label_ptr, m_ptr, log_s_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr,
                 g_ptr, n, k, vc, temperature, log_underflow, n_bucket,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """G[n, vc] = dL/dz of one recomputed tile (softmax_stats.logits_grad_, docs/numerics.md §1),
    every entry written."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n
    col_ok = cols < vc
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, k, stride_hn, stride_hk,
                     stride_wv, stride_wk, BLOCK_N, BLOCK_V, BLOCK_K, PRECISION)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    log_s = tl.load(log_s_ptr + rows, mask=row_ok, other=0.0)
    logp = (z - m[:, None]) / temperature - log_s[:, None]  # the exact shift first
    p = tl.exp(logp)
    g_lp = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0) / temperature
    coeff = g_lp[:, None]
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0) / temperature
        coeff += (tl.maximum(logp, log_underflow) + entropy[:, None]) * g_h[:, None]
    label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
    g = tl.where(cols[None, :] == label[:, None], g_lp[:, None], 0.0) - p * coeff
    # int64 offsets: tokens x vocabulary-chunk passes 2^31 (e.g. 8192 x 262,144)
    offsets = rows.to(tl.int64)[:, None] * vc + cols[None, :]
    tl.store(g_ptr + offsets, g, mask=row_ok[:, None] & col_ok[None, :])


def _precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None


def local_stats(hidden, weight, labels, shard: VocabShard, temperature: float, split: int):
    """This rank's (m, s, b, z_y) per token: the forward of ``fused_lm_head`` on the GPU."""
    n, k = hidden.shape
    # Splits are whole tiles of every config's BLOCK_V (powers of two), so their count, and with
    # it the output's shape, does not depend on the config the autotuner picks.
    block_v = max(config.kwargs["BLOCK_V"] for config in _stats_kernel.configs)
    split = triton.cdiv(split, block_v) * block_v
    n_splits = max(triton.cdiv(shard.valid, split), 1)
    out = torch.empty((4, n, n_splits), dtype=torch.float32, device=hidden.device)
    label = shard.local_columns(labels).to(torch.int32)  # -1: another rank's

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), n_splits

    _stats_kernel[grid](
        hidden, weight, label, out, n, k, shard.valid, split, temperature, _n_bucket(n),
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        PRECISION=_precision(hidden.dtype),
    )
    m, s, b = softmax_stats.reduce_over_dim(out[0], out[1], out[2], 1, temperature)
    return m, s, b, out[3].sum(dim=1)


def logits_grad(h, weight, c0, c1, label_cols, m, log_s, entropy, grad_logp, grad_entropy,
                temperature):
    """G = dL/dz [n, c1 - c0] (fp32) of one tile, with the signature of the torch tile's
    (``label_cols``: each row's label column in the tile; outside [0, c1 - c0]: none)."""
    n, k = h.shape
    w = weight[c0:c1]
    g = torch.empty((n, c1 - c0), dtype=torch.float32, device=h.device)
    has_entropy_grad = grad_entropy is not None

    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(c1 - c0, meta["BLOCK_V"])

    _grad_kernel[grid](
        h, w, label_cols.to(torch.int32), m, log_s, entropy, grad_logp,
        grad_entropy if has_entropy_grad else grad_logp, g, n, k, c1 - c0, temperature,
        softmax_stats.log_underflow(torch.float32), _n_bucket(n),
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        HAS_ENTROPY_GRAD=has_entropy_grad, PRECISION=_precision(h.dtype),
    )
    return g
