"""Sampling parameters are checked with errors naming the field; top-k / top-p truncation keeps
the right tokens; the gap metric is a mean / max over masked tokens."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_archer.rollout.engine import EntropyAwareDecoding, Sample, SamplingParams
from megatron_archer.rollout.metrics import logprob_gap
from megatron_archer.rollout.sampling import truncate


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", 0),
    ("stop_token_ids", (-1,)), ("temperature", float("inf")), ("max_new_tokens", 2.0),
])  # fmt: skip
def test_sampling_params_errors_name_the_field(field, value):
    kwargs = {"max_new_tokens": 4, field: value}
    with pytest.raises(ValueError, match=rf"^{field} must .*; got {re.escape(repr(value))}$"):
        SamplingParams(**kwargs)


def test_entropy_rule_and_sample_are_checked():
    with pytest.raises(ValueError, match=r"^t_low must be in \(0.0, inf\]; got 0.0$"):
        EntropyAwareDecoding(threshold=1.0, t_high=1.0, t_low=0.0)
    with pytest.raises(ValueError, match="logprobs"):
        Sample(token_ids=[1, 2], logprobs=[0.0], finish_reason="stop")
    with pytest.raises(ValueError, match="finish_reason"):
        Sample(token_ids=[1], logprobs=[0.0], finish_reason="abort")


def test_truncate_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(truncate(logits, 2, 1.0)) == [True, True, False, False]
    assert keep(truncate(logits, -1, 0.8)) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(truncate(logits, -1, 0.81)) == [True, True, True, False]
    assert keep(truncate(logits, -1, 0.4)) == [True, False, False, False]


def test_logprob_gap_over_masked_tokens():
    rollout = torch.tensor([[-1.0, -2.0, -3.0]])
    train = torch.tensor([[-1.5, -2.0, -9.0]])
    gap = logprob_gap(rollout, train, torch.tensor([[True, True, False]]))
    assert gap["rollout/logprob_abs_diff_mean"] == pytest.approx(0.25)
    assert gap["rollout/logprob_abs_diff_max"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no response token"):
        logprob_gap(rollout, train, torch.zeros(1, 3, dtype=torch.bool))
