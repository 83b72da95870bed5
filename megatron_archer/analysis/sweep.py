"""Evaluation under entropy-aware decoding (docs/numerics.md §6): a sweep of (threshold, T_high, T_low).

Each setting samples k responses per problem with the rollout engine's ``EntropyAwareDecoding``
(T_high where the token's entropy exceeds the threshold, T_low elsewhere) and scores them with the
reward function: one row per setting with accuracy, mean reward and mean response length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from megatron_archer.analysis.responses import generate_responses
from megatron_archer.data import Prompt
from megatron_archer.rewards import RewardFn
from megatron_archer.rollout import EntropyAwareDecoding, RolloutEngine, SamplingParams


def parse_setting(text: str, p80: float | None = None) -> EntropyAwareDecoding:
    """``"threshold:t_high:t_low"``, e.g. ``"0.672:1.0:0.6"``; threshold ``p80`` means the
    measured 80th entropy percentile (the forking threshold), passed as ``p80``."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"sweep setting {text!r} is not threshold:t_high:t_low")
    threshold, t_high, t_low = parts
    if threshold == "p80":
        if p80 is None:
            raise ValueError(f"sweep setting {text!r}: no measured 80th percentile to use")
        threshold_value = p80
    else:
        threshold_value = float(threshold)
    return EntropyAwareDecoding(threshold_value, float(t_high), float(t_low))


def run_sweep(engine: RolloutEngine, prompts: Sequence[Prompt],
              settings: Sequence[EntropyAwareDecoding], reward_fn: RewardFn,
              decode: Callable[[Sequence[int]], str], *, samples_per_problem: int,
              max_new_tokens: int, stop_token_ids: Sequence[int] = (), seed: int = 0) -> list[dict]:
    """One row per setting: ``threshold``, ``t_high``, ``t_low``, ``responses``, ``accuracy``
    (share with a positive reward), ``mean_reward`` and ``mean_length`` (tokens)."""
    rows = []
    for setting in settings:
        params = SamplingParams(max_new_tokens=max_new_tokens, n=samples_per_problem,
                                stop_token_ids=tuple(stop_token_ids), seed=seed,
                                entropy_aware=setting)
        responses = generate_responses(engine, prompts, params)
        rewards = [reward_fn(decode(r.response_ids), r.reference).value for r in responses]
        rows.append({
            "threshold": setting.threshold, "t_high": setting.t_high, "t_low": setting.t_low,
            "responses": len(responses),
            "accuracy": sum(value > 0 for value in rewards) / len(rewards),
            "mean_reward": sum(rewards) / len(rewards),
            "mean_length": sum(len(r.response_ids) for r in responses) / len(responses),
        })
    return rows
