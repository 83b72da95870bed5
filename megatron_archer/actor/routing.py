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

The model must be built with ``moe_enable_routing_replay=True`` to replay (``replay_fields``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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

    def mismatch(self, reference: list[list[MicroBatchRouting]]) -> tuple[int, int]:
        """(token-layer pairs whose expert set differs from ``reference``, all pairs), summed
        over this rank's micro-batches and every rank of the job (one all-reduce)."""
        totals = torch.zeros(2, dtype=torch.int64)
        for recorded, expected in zip(self.routing, reference):
            if len(recorded) != len(expected):
                raise ValueError(f"routing: {len(recorded)} micro-batches ran, "
                                 f"{len(expected)} recorded")
            for layers, expected_layers in zip(recorded, expected):
                for got, want in zip(layers, expected_layers):
                    if got.shape != want.shape:
                        raise ValueError(f"routing: a micro-batch's tokens differ from the "
                                         f"recorded ones ({tuple(got.shape)} vs "
                                         f"{tuple(want.shape)}): the batch was packed otherwise")
                    totals[0] += int((got != want).any(dim=-1).sum())
                    totals[1] += got.shape[0]
        dist.all_reduce(totals)
        return int(totals[0]), int(totals[1])


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
