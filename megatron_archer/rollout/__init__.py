"""Rollout engines: one interface (``engine``), an embedded transformers engine (``local_engine``)
and an SGLang adapter (``sglang_engine``), with the log-prob convention of ``engine``."""

from megatron_archer.rollout.engine import (
    EntropyAwareDecoding,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from megatron_archer.rollout.http_client import RetryPolicy, ServerError
from megatron_archer.rollout.local_engine import LocalEngine
from megatron_archer.rollout.metrics import logprob_gap
from megatron_archer.rollout.sglang_engine import SGLangEngine

__all__ = [
    "EntropyAwareDecoding",
    "LocalEngine",
    "RetryPolicy",
    "RolloutEngine",
    "SGLangEngine",
    "Sample",
    "SamplingParams",
    "ServerError",
    "logprob_gap",
]
