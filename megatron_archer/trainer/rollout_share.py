"""Each data-parallel rank's share of a step's rollout, sent from global rank 0 as flat tensors.

Rank 0 holds the generated groups. Every other rank needs only its data-parallel share of each
mini-batch: token ids, response masks, the engine's log-probs and the advantages. Rank 0 packs
each share into two flat buffers (int32: counts, lengths and token ids; float32: advantages and
rollout log-probs), and scatters over the world group deliver them: first the buffer sizes
(with the padded widths), then the buffers, padded to the largest share (a scatter sends equal
sizes). The ranks of one
model-parallel group (tensor and pipeline ranks of the same data-parallel rank) receive the same
share. No Python object is pickled. The engine's routing (``actor.routing_replay: rollout``)
follows the rest of the int32 buffer: [num_layers, top_k, then per sequence its routed tokens
(prompt + response - 1), then every sequence's experts as int16, two to an int32 word]; a share
without it is packed as before.

Bytes moved per step: about world_size x (4 x T_max + 4 x R_max + 8 x S_max) where T_max,
R_max and S_max are the largest share's tokens (prompt + response), response tokens and
sequences. At paper scale (512 prompts x 16 responses, ~1k-token prompts, ~10k-token responses,
data-parallel 16 on 128 GPUs) a share is 1/16 of ~90 M tokens: ~23 MB of token ids and ~21 MB of
log-probs, ~5.6 GB over all 128 ranks; each rank receives only its own ~44 MB, where pickling the
whole batch to every rank moved ~1 GB to each. The routing adds 2 x num_layers x top_k bytes a
token: 768 for Qwen3-30B-A3B (48 layers, top-8), ~4.3 GB a share at that scale, about 100 times
the rest (``megatron-archer plan`` counts it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor import SequenceBatch
from megatron_archer.trainer.step import MiniBatch

SIZES = 4  # int32 and float32 buffer lengths, and the widths every rank's buffers are padded to


def pack_share(mini_batches: Sequence[MiniBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batches (their batch, advantages and rollout log-probs) -> (int32, float32 buffer).

    int32: [num_mini_batches, then per mini-batch: num_sequences, then per sequence:
    prompt_length, response_length, then its token ids], then the routing when the mini-batches
    carry it (module docstring); float32: per mini-batch its advantages [b], then each
    sequence's rollout log-probs [response_length]. Response tokens are the sequence's tail (a
    prompt followed by a response, as the trainer builds them).
    """
    ints = [torch.tensor([len(mini_batches)], dtype=torch.int32)]
    floats = [torch.zeros(0, dtype=torch.float32)]
    for mb in mini_batches:
        ints.append(torch.tensor([len(mb.batch)], dtype=torch.int32))
        floats.append(mb.advantages.reshape(-1).to(torch.float32))
        for i, (ids, mask) in enumerate(zip(mb.batch.input_ids, mb.batch.response_mask)):
            responses = int(mask.sum())
            ints += [torch.tensor([ids.numel() - responses, responses], dtype=torch.int32),
                     ids.to(torch.int32)]
            floats.append(mb.rollout_logp[i, :responses].to(torch.float32))
    routing = [r for mb in mini_batches if mb.batch.routing is not None for r in mb.batch.routing]
    if routing:
        experts = torch.cat([r.reshape(-1).to(torch.int16) for r in routing])
        if experts.numel() % 2:  # two int16 per int32 word
            experts = torch.cat([experts, experts.new_zeros(1)])
        ints += [torch.tensor([*routing[0].shape[1:], *(r.shape[0] for r in routing)],
                              dtype=torch.int32), experts.view(torch.int32)]
    return torch.cat(ints), torch.cat(floats)


def unpack_share(ints: torch.Tensor, floats: torch.Tensor) -> list[MiniBatch]:
    """The inverse of ``pack_share``. Token ids, log-probs and routing are sliced out of the
    buffers as tensors; only the counts and lengths are read one by one."""
    pos, fpos = 1, 0
    out = []
    for _ in range(int(ints[0])):
        count = int(ints[pos])
        pos += 1
        advantages = floats[fpos:fpos + count].clone()
        fpos += count
        ids, masks, rollout = [], [], []
        for _ in range(count):
            prompt, responses = ints[pos:pos + 2].tolist()
            pos += 2
            ids.append(ints[pos:pos + prompt + responses].long())
            pos += prompt + responses
            masks.append(torch.cat([torch.zeros(prompt, dtype=torch.bool),
                                    torch.ones(responses, dtype=torch.bool)]))
            rollout.append(floats[fpos:fpos + responses].clone())
            fpos += responses
        out.append(MiniBatch(SequenceBatch(ids, masks), advantages,
                             torch.nn.utils.rnn.pad_sequence(rollout, batch_first=True)))
    if pos < ints.numel():
        layers, top_k = ints[pos:pos + 2].tolist()
        sequences = sum(len(mb.batch) for mb in out)
        rows = ints[pos + 2:pos + 2 + sequences].tolist()
        sizes = [tokens * layers * top_k for tokens in rows]
        experts = ints[pos + 2 + sequences:].view(torch.int16)[:sum(sizes)].split(sizes)
        routed = iter([e.clone().view(tokens, layers, top_k) for e, tokens in zip(experts, rows)])
        for mb in out:
            routing = [next(routed) for _ in range(len(mb.batch))]
            mb.batch = SequenceBatch(mb.batch.input_ids, mb.batch.response_mask, routing)
    return out


def _data_parallel_ranks() -> list[int]:
    """The data-parallel rank of every global rank (one all-gather of one int each)."""
    mine = torch.tensor([parallel_state.get_data_parallel_rank()], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t) for t in every]


def scatter_shares(shares: Sequence[Sequence[MiniBatch]] | None) -> tuple[list[MiniBatch], int]:
    """Global rank 0 passes ``shares[d]``, data-parallel rank d's mini-batches, for every d; every
    rank (rank 0 included) returns its own share and the bytes the scatters moved."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return list(shares[0]), 0
    owners = _data_parallel_ranks()
    sizes = torch.zeros(SIZES, dtype=torch.int64)  # this share's lengths, then the padded widths
    size_list = packed = None
    if rank == 0:
        packed = [pack_share(share) for share in shares]
        widths = [max(p[0].numel() for p in packed), max(p[1].numel() for p in packed)]
        size_list = [torch.tensor([packed[d][0].numel(), packed[d][1].numel(), *widths],
                                  dtype=torch.int64) for d in owners]
    dist.scatter(sizes, size_list, src=0)
    n_int, n_float, int_width, float_width = sizes.tolist()
    ints = torch.zeros(int_width, dtype=torch.int32)
    floats = torch.zeros(float_width, dtype=torch.float32)
    int_list = float_list = None
    if rank == 0:
        int_list = [_padded(packed[d][0], int_width) for d in owners]
        float_list = [_padded(packed[d][1], float_width) for d in owners]
    dist.scatter(ints, int_list, src=0)
    dist.scatter(floats, float_list, src=0)
    moved = world * (SIZES * 8 + 4 * int_width + 4 * float_width)
    return unpack_share(ints[:n_int], floats[:n_float]), moved


def _padded(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(width - tensor.numel())])
