"""One decoding step on full-vocabulary logits: temperature (fixed or entropy-aware), top-k /
top-p truncation, the draw, and the log-prob convention of ``rollout.engine``."""

from __future__ import annotations

import torch

from megatron_archer.rollout.engine import SamplingParams


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dimension, fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def step_temperatures(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The temperature of each row [B]: ``params.temperature``, or T_high / T_low by the row's
    entropy at T = 1 under entropy-aware decoding (1 for greedy: the log-prob's temperature)."""
    rows = logits.shape[0]
    rule = params.entropy_aware
    if rule is None:
        value = 1.0 if params.greedy else params.temperature
        return torch.full((rows,), value, dtype=torch.float32, device=logits.device)
    high = token_entropy(logits) > rule.threshold
    return torch.where(high, rule.t_high, rule.t_low).to(torch.float32)


def truncate(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``scaled`` logits with tokens outside the top-k and the top-p nucleus set to -inf.
    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p``."""
    out = scaled
    if top_k != -1 and top_k < scaled.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # the first token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_step(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` [B, V]: (tokens [B], their log-probs under
    softmax(logits / T) before truncation [B], the temperatures T [B])."""
    logits = logits.float()
    temperatures = step_temperatures(logits, params)
    scaled = logits / temperatures[:, None]
    logp = torch.log_softmax(scaled, dim=-1)
    if params.greedy:
        tokens = logits.argmax(-1)
    else:
        probs = torch.softmax(truncate(scaled, params.top_k, params.top_p), dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1), temperatures
