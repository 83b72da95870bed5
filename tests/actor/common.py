"""Shared inputs and independent references for the actor tests."""

from __future__ import annotations

import torch

from megatron_archer.actor import SequenceBatch
from tests.models.checkpoints import hf_model

VOCAB = 250  # tests/models/checkpoints.py's tiny models


def make_batch(num_sequences: int, seed: int, min_len: int = 6, max_len: int = 22) -> SequenceBatch:
    """Variable-length sequences; response = a random-length tail (one with a hole in its mask)."""
    g = torch.Generator().manual_seed(seed)
    ids, masks = [], []
    for i in range(num_sequences):
        n = int(torch.randint(min_len, max_len + 1, (), generator=g))
        prompt = int(torch.randint(1, n - 1, (), generator=g))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[prompt:] = True
        if i == 1 and n - prompt > 3:
            mask[prompt + 1] = False  # multi-turn style hole
        ids.append(torch.randint(0, VOCAB, (n,), generator=g))
        masks.append(mask)
    return SequenceBatch(input_ids=ids, response_mask=masks)


def _forced_routing(model, routing: list[torch.Tensor]):
    """Hooks on a transformers Qwen3-MoE model's routers that dispatch the first tokens of the
    next forward (one sequence) to ``routing[0]`` ([tokens, num_layers, k]) with the router's own
    softmax weights at those experts (renormalised with ``norm_topk_prob``), as megatron's
    replay does; the handles."""
    def hook(index, module, inputs, output):
        logits, _, chosen = output
        forced = chosen.clone()
        rows = routing[0][:, index].long()
        forced[:rows.shape[0]] = rows
        weights = torch.softmax(logits, dim=-1, dtype=logits.dtype).gather(-1, forced)
        if module.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, forced

    return [layer.mlp.gate.register_forward_hook(
        lambda module, inputs, output, index=index: hook(index, module, inputs, output))
        for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def hf_logprobs(checkpoint, batch: SequenceBatch, temperature: float = 1.0,
                dtype: torch.dtype = torch.float32):
    """Each sequence alone through transformers (positions from 0) in ``dtype``, float64
    log_softmax: per sequence, in order, its response tokens' (logp, entropy, max |logit|), the
    last being the scale log-probs and entropies round at (tests/numerics.py). A batch carrying
    the engine's routing (``SequenceBatch.routing``) is dispatched to those experts."""
    model = hf_model(checkpoint, dtype)
    out = []
    current: list[torch.Tensor] = []
    if batch.routing is not None:
        _forced_routing(model, current)
    with torch.no_grad():
        for i, (ids, mask) in enumerate(zip(batch.input_ids, batch.response_mask)):
            current[:] = [batch.routing[i]] if batch.routing is not None else []
            logits = model(input_ids=ids[None]).logits[0].double() / temperature
            logsm = torch.log_softmax(logits[:-1], dim=-1)
            logp = logsm.gather(-1, ids[1:, None])[:, 0]
            entropy = -(logsm.exp() * logsm).sum(-1)
            out.append((logp[mask[1:]], entropy[mask[1:]], logits.abs().max().item()))
    return out


def sample_logprob_failures(checkpoint, prompts, tested, baseline, temperature: float) -> list[str]:
    """Engine samples ``tested`` (groups per prompt) against ``baseline``, the same tokens from
    another float32 computation: each sample's log-probs as accurate against transformers in
    float64 (teacher-forced on its tokens) as the baseline's (tests/numerics.py)."""
    from tests.numerics import accuracy_failure

    pairs = [(prompt, s, b) for prompt, group, base in zip(prompts, tested, baseline)
             for s, b in zip(group, base)]
    assert all(s.token_ids == b.token_ids for _, s, b in pairs), "the samples differ in tokens"
    batch = SequenceBatch(
        input_ids=[torch.tensor(prompt + s.token_ids) for prompt, s, _ in pairs],
        response_mask=[torch.arange(len(prompt) + len(s.token_ids)) >= len(prompt)
                       for prompt, s, _ in pairs])
    reference = hf_logprobs(checkpoint, batch, temperature, dtype=torch.float64)
    failures = [accuracy_failure(f"sample {i}", torch.tensor(s.logprobs), torch.tensor(b.logprobs),
                                 logp, scale=scale)
                for i, ((_, s, b), (logp, _, scale)) in enumerate(zip(pairs, reference))]
    return [f for f in failures if f]
