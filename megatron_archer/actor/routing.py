"""Mixture-of-experts routing: which experts each token was dispatched to in a forward, replayed
in a later forward (routing replay), and the step's routing metrics (docs/numerics.md §11).

A ``RoutingCapture`` holds forward hooks on the routers (megatron's ``TopKRouter``) of this
rank's model chunks. Between ``begin`` and ``end`` of one micro-batch's forward it records, per
MoE layer in order, the experts the layer dispatched each of this rank's tokens to, read from
the router's routing map (sorted expert numbers, [tokens, k] int16 on CPU). Given the experts a
former forward recorded for the same micro-batch, ``begin`` makes every router dispatch to them
(megatron's ``RouterReplay``, ``REPLAY_FORWARD``: the router's scores are gathered at the given
experts, so the weights still carry the router's gradient). A micro-batch's tokens on a rank are
the same in two forwards exactly when its packing is: the actor packs a batch deterministically
(``ModelRunner.micro_batches``), so routing recorded by ``compute_logprobs_and_entropy(batch)``
replays in ``train_step(batch)`` at any layout (tensor, sequence, context and pipeline parallel:
each rank keeps the routing of its own tokens and its own layers).

The rollout engine's routing (``actor.routing_replay: rollout``) comes per sequence
(``SequenceBatch.routing``: [tokens, num_layers, top_k]); ``rollout_replay`` lays it out as a
recorded forward of this rank would have it: the micro-batch's packed row (its filler, under CP
the rank's chunks of each padded sequence, under sequence parallelism the rank's 1/TP of the row),
each chunk's own layers (pipeline stages). Tokens the engine did not route (each sequence's last,
the filler, the CP padding) get experts 0..k-1: they are scored nowhere, and no scored token
attends to them; the mismatch share leaves them out.

The model must be built with ``moe_enable_routing_replay=True`` to replay (``replay_fields``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron_archer.actor.context_parallel import ContextParallelMicroBatch, cp_rank_positions
from megatron_archer.actor.packing import MicroBatch

# one micro-batch's routing on this rank: per MoE layer of the chunk, [tokens, k] expert numbers
MicroBatchRouting = list[torch.Tensor]


def replay_fields() -> dict:
    """TransformerConfig fields a model needs for ``RoutingCapture`` to replay routing."""
    return {"moe_enable_routing_replay": True}


def _routers(chunk: nn.Module) -> list[nn.Module]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in chunk.modules() if isinstance(m, TopKRouter)]


class RoutingCapture:
    """Records (and optionally replays) the routing of every micro-batch forward of ``chunks``.

    ``routing[c]``: chunk c's recorded micro-batches, in the order they ran.
    """

    def __init__(self, chunks: list[nn.Module]):
        self.chunks = chunks
        self.routers = [_routers(chunk) for chunk in chunks]
        self.layer_numbers = [[r.layer_number for r in routers] for routers in self.routers]
        self.routing: list[list[MicroBatchRouting]] = [[] for _ in chunks]
        self._current: list[torch.Tensor] | None = None
        self._replaying: list[nn.Module] = []
        for routers in self.routers:
            for router in routers:
                router.register_forward_hook(self._hook)

    def reset(self) -> None:
        self.routing = [[] for _ in self.chunks]

    def _hook(self, router, inputs, output) -> None:
        if self._current is None:
            return
        routing_map = output[1]  # [tokens, experts] bool: the experts each token is sent to
        k = router.topk
        experts = routing_map.nonzero()[:, 1].view(routing_map.shape[0], k)
        self._current.append(experts.to(device="cpu", dtype=torch.int16))

    def begin(self, chunk: int, replay: MicroBatchRouting | None = None) -> None:
        """Record the next forward of chunk ``chunk``; with ``replay``, dispatch its tokens to
        those experts (one [tokens, k] tensor per MoE layer of the chunk)."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        self._current = []
        if replay is None:
            return
        routers = self.routers[chunk]
        if len(replay) != len(routers):
            raise ValueError(f"routing replay: {len(replay)} layers recorded, the chunk has "
                             f"{len(routers)} MoE layers")
        for router, experts in zip(routers, replay):
            if router.router_replay is None:
                raise ValueError("routing replay needs the model built with "
                                 "moe_enable_routing_replay=True (routing.replay_fields)")
            router.router_replay.clear_indices()
            router.router_replay.set_target_indices(experts.long())
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        self._replaying = routers

    def end(self, chunk: int) -> None:
        """Keep the forward's routing as chunk ``chunk``'s next micro-batch; stop replaying."""
        self.routing[chunk].append(self._current)
        self._current = None
        for router in self._replaying:
            router.router_replay.clear_router_replay_action()
            router.router_replay.clear_indices()
        self._replaying = []

    def expert_counts(self, num_layers: int, num_experts: int) -> torch.Tensor:
        """Tokens dispatched to each expert [num_layers, num_experts] (global layer numbers) over
        every micro-batch recorded here and every rank of the job (one all-reduce): a token
        seen by several tensor-parallel ranks (no sequence parallelism) counts on each, which
        leaves every ratio of counts unchanged."""
        counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        for numbers, micro_batches in zip(self.layer_numbers, self.routing):
            for routing in micro_batches:
                for number, experts in zip(numbers, routing):
                    counts[number - 1] += torch.bincount(experts.reshape(-1).long(),
                                                         minlength=num_experts)
        dist.all_reduce(counts)
        return counts

    def mismatch(self, reference: list[list[MicroBatchRouting]],
                 known: list[list[torch.Tensor]] | None = None) -> tuple[int, int]:
        """(token-layer pairs whose expert set differs from ``reference``, all pairs), summed
        over this rank's micro-batches and every rank of the job (one all-reduce); with
        ``known`` ([tokens] bool per chunk and micro-batch, ``rollout_replay``) only its
        tokens count."""
        totals = torch.zeros(2, dtype=torch.int64)
        for c, (recorded, expected) in enumerate(zip(self.routing, reference)):
            if len(recorded) != len(expected):
                raise ValueError(f"routing: {len(recorded)} micro-batches ran, "
                                 f"{len(expected)} recorded")
            for m, (layers, expected_layers) in enumerate(zip(recorded, expected)):
                for got, want in zip(layers, expected_layers):
                    if got.shape != want.shape:
                        raise ValueError(f"routing: a micro-batch's tokens differ from the "
                                         f"recorded ones ({tuple(got.shape)} vs "
                                         f"{tuple(want.shape)}): the batch was packed otherwise")
                    differ = (got != want).any(dim=-1)
                    if known is not None:
                        differ = differ[known[c][m]]
                    totals[0] += int(differ.sum())
                    totals[1] += differ.numel()
        dist.all_reduce(totals)
        return int(totals[0]), int(totals[1])


def _row_routing(routing: Sequence[torch.Tensor], mb: MicroBatch, num_layers: int,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of each token of ``mb``'s row on this rank ([n, num_layers, top_k] int16,
    sorted, as ``RoutingCapture`` records them) and which tokens the engine routed ([n] bool),
    from per-sequence ``routing`` (module docstring)."""
    real = mb.cu_seqlens.cpu().long()
    n = int(real[-1])
    experts = torch.arange(top_k, dtype=torch.int16).expand(n, num_layers, top_k).clone()
    known = torch.zeros(n, dtype=torch.bool)
    for start, i in zip(real.tolist(), mb.indices):
        rows = routing[i]
        if tuple(rows.shape[1:]) != (num_layers, top_k):
            raise ValueError(f"routing of sequence {i}: [tokens, layers, top_k] = "
                             f"{list(rows.shape)}, the model has {num_layers} layers, top-{top_k}")
        experts[start:start + rows.shape[0]] = rows.sort(dim=-1).values.to(torch.int16)
        known[start:start + rows.shape[0]] = True
    if not isinstance(mb, ContextParallelMicroBatch):
        return experts, known
    padded = mb.cu_seqlens_padded.cpu().long()
    sequence = torch.repeat_interleave(torch.arange(real.numel() - 1), real[1:] - real[:-1])
    to_padded = torch.arange(n) - real[sequence] + padded[sequence]
    full = torch.arange(top_k, dtype=torch.int16).expand(
        int(padded[-1]), num_layers, top_k).clone()
    full_known = torch.zeros(int(padded[-1]), dtype=torch.bool)
    full[to_padded], full_known[to_padded] = experts, known
    positions = cp_rank_positions(padded, mb.cp_size, mb.cp_rank)
    return full[positions], full_known[positions]


def rollout_replay(routing: Sequence[torch.Tensor], micro_batches: Sequence[MicroBatch],
                   layer_numbers: list[list[int]], num_layers: int, top_k: int,
                   sp_size: int = 1, sp_rank: int = 0
                   ) -> tuple[list[list[MicroBatchRouting]], list[list[torch.Tensor]]]:
    """The engine's per-sequence ``routing`` as this rank's recorded routing of
    ``micro_batches`` (``RoutingCapture.routing``'s layout: per chunk, per micro-batch, one
    [tokens, k] tensor per MoE layer of the chunk, ``layer_numbers`` 1-based), and per chunk and
    micro-batch the [tokens] mask of those the engine routed. ``sp_size`` > 1 (sequence
    parallelism): the rank's router sees part ``sp_rank`` of ``sp_size`` equal parts of the
    row."""
    rows = []
    for mb in micro_batches:
        experts, known = _row_routing(routing, mb, num_layers, top_k)
        part = experts.shape[0] // sp_size
        rows.append((experts[sp_rank * part:(sp_rank + 1) * part],
                     known[sp_rank * part:(sp_rank + 1) * part]))
    replay = [[[experts[:, number - 1] for number in numbers] for experts, _ in rows]
              for numbers in layer_numbers]
    return replay, [[known for _, known in rows] for _ in layer_numbers]


def load_metrics(counts: torch.Tensor, moe_layers) -> dict[str, float]:
    """Per MoE layer (1-based, megatron's numbering), the busiest expert's tokens over the mean
    (1 = perfectly balanced, num_experts = every token on one expert)."""
    out = {}
    for layer in moe_layers:
        row = counts[layer].double()
        if row.sum() > 0:
            out[f"moe/expert_load_max_over_mean/layer_{layer + 1}"] = (
                row.max() / row.mean()).item()
    return out


def aux_loss_metric(num_micro_batches: int, num_moe_layers: int) -> dict[str, float]:
    """The load-balancing loss megatron tracked during the step's training forwards (without its
    coefficient), averaged over MoE layers and micro-batches; its tracker is reset. Empty when
    the loss is off. megatron's own reduction uses an averaging all-reduce, which gloo lacks:
    here each rank's partial sum is added over the tracker's group (tensor x context parallel:
    each rank's own tokens), averaged over data-parallel ranks and added over pipeline stages
    (each holds its own layers)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    if entry is None:
        return {}
    values = entry["values"].detach().double().cpu()
    entry["values"].zero_()
    if entry.get("reduce_group") is not None:
        dist.all_reduce(values, group=entry["reduce_group"])
    dp_group = parallel_state.get_data_parallel_group()
    dist.all_reduce(values, group=dp_group)
    values /= dist.get_world_size(dp_group)
    dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    return {"moe/aux_loss": values.sum().item() / (num_micro_batches * num_moe_layers)}
