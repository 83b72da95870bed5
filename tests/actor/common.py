"""Shared inputs and independent references for the actor tests."""

from __future__ import annotations

import torch
import transformers

from megatron_archer.actor import SequenceBatch

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


def hf_logprobs(checkpoint, batch: SequenceBatch, temperature: float = 1.0):
    """Each sequence alone through transformers (positions from 0), float64 log_softmax:
    per-sequence (logp, entropy) of its response tokens, in order."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids, mask in zip(batch.input_ids, batch.response_mask):
            logits = model(input_ids=ids[None]).logits[0].double() / temperature
            logsm = torch.log_softmax(logits[:-1], dim=-1)
            logp = logsm.gather(-1, ids[1:, None])[:, 0]
            entropy = -(logsm.exp() * logsm).sum(-1)
            out.append((logp[mask[1:]], entropy[mask[1:]]))
    return out
