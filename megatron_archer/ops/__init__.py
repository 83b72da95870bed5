"""Numerical kernels: per-token log-prob and entropy on vocabulary-sharded logits (SPEC §1)."""

from megatron_archer.ops.vocab_parallel import vocab_parallel_logprobs_and_entropy

__all__ = ["vocab_parallel_logprobs_and_entropy"]
