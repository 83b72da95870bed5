"""Numerical kernels: per-token log-prob and entropy on vocabulary-sharded logits (docs/numerics.md §1)."""

from megatron_archer.ops.fused_lm_head import fused_lm_head_logprobs_and_entropy
from megatron_archer.ops.vocab_parallel import vocab_parallel_logprobs_and_entropy

__all__ = ["fused_lm_head_logprobs_and_entropy", "vocab_parallel_logprobs_and_entropy"]
