"""The actor: per-token log-probs / entropy and optimiser steps over megatron model chunks.

One code path on both homes. Micro-batches are packed by a token budget (``packing``) and run
through megatron's ``get_forward_backward_func`` schedules (no pipelining, or 1F1B / interleaved
with pipeline parallelism). On CUDA the model is wrapped in megatron's DistributedDataParallel
and optimised by ``get_megatron_optimizer`` (distributed optimizer, bf16 with fp32 main params
when ``params_dtype="bfloat16"``). On CPU ``megatron_archer.compat`` makes the same schedules run
and ``actor.cpu_ddp`` replaces what needs CUDA: DDP's gradient sync and ``finalize_model_grads``
(``cpu_ddp.finalize_model_grads_cpu``) and the gradient norm (``cpu_ddp.grad_norm_cpu``); the
optimiser is torch's AdamW with megatron's weight-decay grouping and clipping rule.

Loss contract of ``train_step(batch, loss_fn)``: ``loss_fn(micro_batch, logp, entropy)`` returns
the micro-batch's share of the step loss (``megatron_archer.algorithms.policy_loss(...).loss``),
optionally with a dict of metrics. The actor multiplies it by num_micro_batches x dp_size before
handing it to the schedule, which undoes megatron's 1/num_micro_batches and DDP's 1/dp averaging:
the gradient is d(step loss)/d(params) however the step is split over micro-batches and ranks.

Context parallelism (``initialize_model_parallel(context_parallel_size=N)``, docs/numerics.md §9): every
packed micro-batch is split by ``context_parallel.split_for_context_parallel``; on each CP rank
``loss_fn`` gets the micro-batch's response layout with ``response_mask`` True at the tokens that
rank scores (give the algorithms ``cp_group`` and the data x context parallel group);
``compute_logprobs_and_entropy`` returns every token on every CP rank; the step loss is summed
over data x context parallel ranks. DDP averages gradients over them, megatron's schedule
multiplies each loss by the CP size, and the scale above undoes the rest.

Sequence parallelism (the models' ``sequence_parallel``, TP > 1): every packed row (under CP,
every sequence's chunk) is padded to a multiple of the TP size, times the fp8 recipe's alignment
with fp8 (``pack_multiple``; the filler enters no loss or metric). Megatron's output layer
all-gathers the sequence before its column-parallel matmul, so the last stage's output is the
whole row's vocab-sharded logits, as without it, which the vocab-parallel op takes unchanged;
the norms' weight gradients, partial on each TP rank, are summed over TP by
``finalize_model_grads`` (``cpu_ddp`` on CPU).

Where results live: the logits, hence log-probs and the loss, exist on the last pipeline stage.
``compute_logprobs_and_entropy`` broadcasts its [B, R] results from the last stage to every
pipeline stage, so every rank holds the results for its own data-parallel share of the batch.
``train_step``'s step loss and gradient norm are the same on every rank; per-micro-batch metrics
are on the last stage only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from megatron_archer import compat
from megatron_archer.actor import cpu_ddp
from megatron_archer.actor.config import ActorConfig
from megatron_archer.actor.context_parallel import split_for_context_parallel
from megatron_archer.actor.packing import (
    MicroBatch,
    SequenceBatch,
    pack,
    plan_micro_batches,
    scatter_to_batch,
)
from megatron_archer.actor.routing import (
    RoutingCapture,
    aux_loss_metric,
    load_metrics,
    rollout_replay,
)
from megatron_archer.algorithms.sharded_rows import check_together
from megatron_archer.nonfinite import NonFiniteError, first_ranks
from megatron_archer.ops import (
    fused_lm_head_logprobs_and_entropy,
    vocab_parallel_logprobs_and_entropy,
)

LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class LogprobResult:
    """Per-token results of a batch in the response layout [B, R] (zeros outside ``mask``)."""

    logp: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    # a mixture-of-experts model's routing, per chunk and micro-batch (actor.routing)
    routing: list | None = None


@dataclass
class StepResult:
    """What one ``train_step`` did, the same on every rank. ``loss`` is the step loss (sum of
    every micro-batch share on every data-parallel rank); ``grad_norm`` the global norm before
    clipping; ``skipped`` True when some rank found a non-finite tensor: nothing was changed then,
    and ``nonfinite`` maps each such tensor's name (``megatron_archer.nonfinite.TENSORS``) to the
    lowest global rank that found it."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_micro_batches: int
    step: int
    micro_batch_metrics: list[dict] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    # a mixture-of-experts model's routing metrics (actor.routing), the same on every rank
    moe_metrics: dict[str, float] = field(default_factory=dict)


def unwrap_chunk(chunk: nn.Module) -> nn.Module:
    """The model inside a chunk's wrappers (DDP, Float16Module, ...): each keeps it as ``module``."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _check_packed_attention(backend: str, params_dtype: torch.dtype) -> None:
    """Transformer Engine has no attention backend for packed (thd) rows in float32: flash and
    fused attention need bf16/fp16, and its unfused attention rejects thd."""
    if backend == "te" and params_dtype == torch.float32:
        raise ValueError(
            "model.backend='te' with actor.params_dtype='float32': Transformer Engine has no "
            "attention backend for packed (thd) batches in float32; use actor.params_dtype="
            "'bfloat16' or model.backend='local'")


class _HiddenStatesHead:
    """Makes a last-stage GPTModel return its final hidden states [b, s, H] instead of logits,
    for ``logprob_impl="fused"``, by replacing its ``output_layer``'s forward on this instance.

    The output layer keeps its parameter (optimizer, DDP, checkpoints and export are unchanged);
    ``output_weight`` is the [V/tp, H] weight the logits would have used (the shared embedding
    when tied). Skipping megatron's ColumnParallelLinear also skips its tensor-parallel
    all-reduce of d hidden, which the fused op does itself (ops/fused_lm_head.py).
    """

    def __init__(self, gpt: nn.Module):
        self.gpt = gpt
        gpt.output_layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (
            hidden, None)

    def output_weight(self) -> torch.Tensor:
        if self.gpt.share_embeddings_and_output_weights:
            return self.gpt.shared_embedding_or_output_weight()
        return self.gpt.output_layer.weight


def _hidden_states_head(chunks: list[nn.Module]) -> _HiddenStatesHead | None:
    """The head of this rank's last-stage chunk (None on other pipeline stages)."""
    last = [unwrap_chunk(c) for c in chunks if getattr(unwrap_chunk(c), "post_process", False)]
    return _HiddenStatesHead(last[-1]) if last else None


def fp8_alignment(recipe: str) -> int:
    """The row count a Transformer Engine fp8 GEMM needs a multiple of: 32 for ``mxfp8`` (its
    1 x 32 scaling blocks), 16 for the other recipes (as megatron's fp8 padding aligns them)."""
    return 32 if recipe == "mxfp8" else 16


def pack_multiple(model_config) -> int:
    """What every packed row's token count (under CP, every sequence's chunk) must be a multiple
    of: the fp8 recipe's alignment for fp8 GEMMs; under sequence parallelism the TP size times
    that, since megatron's embedding scatters the row's tokens evenly over the TP ranks and each
    rank's fp8 linear sees its own n / TP rows before the all-gather. The filler
    (``packing.filler_tokens``) or the CP padding makes it so and enters no loss or metric."""
    fp8 = fp8_alignment(getattr(model_config, "fp8_recipe", "delayed")) if model_config.fp8 else 1
    sp = model_config.tensor_model_parallel_size if model_config.sequence_parallel else 1
    return fp8 * sp


def ddp_config():
    """megatron's DDP settings of the actor on CUDA: gradients reduced in fp32, no overlap, the
    distributed optimizer (``plan`` lays out the same buffers)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True)


class ModelRunner:
    """Forward-only log-probs and entropy of model chunks (shared by Actor and ReferenceModel)."""

    def __init__(self, model: nn.Module | Sequence[nn.Module], spec, config: ActorConfig,
                 backend: str):
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        self.spec = spec
        self.config = config
        self.backend = backend
        self.on_cuda = not compat.cpu_patches_needed()
        compat.apply_cpu_patches()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else None
        for chunk in self.chunks:
            model_config = unwrap_chunk(chunk).config
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                model_config.variable_seq_lengths = True  # packed rows differ in length
            if not self.on_cuda:
                model_config.finalize_model_grads_func = cpu_ddp.finalize_model_grads_cpu
        model_config = unwrap_chunk(self.chunks[0]).config
        _check_packed_attention(backend, model_config.params_dtype)
        # log-probs and entropy are float32 for float32 and bf16 models, float64 for float64 ones
        self.result_dtype = torch.promote_types(model_config.params_dtype, torch.float32)
        self.pack_multiple = pack_multiple(model_config)
        if config.logprob_impl == "fused" and model_config.sequence_parallel:  # on every rank
            raise ValueError("actor.logprob_impl='fused' does not support sequence parallelism: "
                             "the output layer would all-gather the sequence-sharded hidden states")
        self._head = _hidden_states_head(self.chunks) if config.logprob_impl == "fused" else None
        # context parallelism (docs/numerics.md §9): every CP rank runs its chunks of each packed row
        self.cp_size = parallel_state.get_context_parallel_world_size()
        # mixture of experts: every forward's routing is recorded, and replayed on request
        self.routing = (RoutingCapture([unwrap_chunk(c) for c in self.chunks]) if spec.is_moe
                        else None)
        self._replay: list | None = None

    # ---------------------------------------------------------------- micro-batches
    def micro_batches(self, batch: SequenceBatch) -> list[MicroBatch]:
        """This rank's packed micro-batches of ``batch`` (its data-parallel share).

        Every data-parallel rank gets the same number (the largest any rank needs; one
        all-reduce), as megatron's schedules and ``build_step_context`` require. Deterministic,
        so a trainer calling it before ``train_step`` sees the micro-batches ``loss_fn`` gets.
        A sequence over the token budget on any rank raises on every rank (after the all-reduce,
        so no rank is left waiting in it).
        """
        lengths = batch.lengths
        try:
            plan, problem = plan_micro_batches(lengths, self.config.max_tokens_per_micro_batch), None
        except ValueError as error:
            plan, problem = [], str(error)
        count = torch.tensor([len(plan), problem is not None], dtype=torch.int64)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        if count[1]:
            raise ValueError(problem or "another data-parallel rank has a sequence longer than "
                             "ActorConfig.max_tokens_per_micro_batch")
        plan = plan_micro_batches(lengths, self.config.max_tokens_per_micro_batch, int(count[0]))
        if self.cp_size == 1:
            return [pack(batch, indices, device=self.device, multiple=self.pack_multiple)
                    for indices in plan]
        # under CP the split pads every sequence (to 2 CP x pack_multiple) and labels come from
        # the unsplit row: actor.context_parallel
        cp_rank = parallel_state.get_context_parallel_rank()
        return [split_for_context_parallel(pack(batch, indices, device=self.device), self.cp_size,
                                           cp_rank, self.pack_multiple) for indices in plan]

    def _model_inputs(self, mb: MicroBatch) -> dict:
        # both backends take the packed row's cu_seqlens (packing.MicroBatch.packed_seq_params)
        return dict(attention_mask=None, packed_seq_params=mb.packed_seq_params())

    def _logprobs(self, mb: MicroBatch, output: torch.Tensor, entropy_grad: bool):
        """[b, R_mb] log-probs and entropies of ``mb``'s response tokens from the last stage's
        output: logits [1, n, V/tp], or with ``logprob_impl="fused"`` the final hidden states
        [1, n, H], turned into the same results with the output weight without any logits."""
        selected = output[0, mb.label_positions]
        options = dict(temperature=self.config.temperature,
                       tp_group=parallel_state.get_tensor_model_parallel_group(),
                       vocab_size=self.spec.vocab_size, entropy_grad=entropy_grad)
        if self._head is not None:
            logp, entropy = fused_lm_head_logprobs_and_entropy(
                selected, self._head.output_weight(), mb.labels,
                chunk_size=self.config.logprob_chunk_size, **options)
        else:
            logp, entropy = vocab_parallel_logprobs_and_entropy(
                selected, mb.labels, chunk_size=self.config.logprob_chunk_size, **options)
        return mb.to_layout(logp), mb.to_layout(entropy)

    def _logprobs_together(self, mb: MicroBatch, output: torch.Tensor, entropy_grad: bool):
        """``_logprobs``, raising NonFiniteError on every CP rank when any of them found
        non-finite logits: a loss function's per-response statistics are collectives over the CP
        group (``algorithms.sharded_rows``), which a rank skipping its loss would leave waiting."""
        results = []
        group = parallel_state.get_context_parallel_group() if self.cp_size > 1 else None
        check_together(lambda: results.append(self._logprobs(mb, output, entropy_grad)), group)
        return results[0]

    def _forward_step(self, loss_func_factory, data_iterator, model):
        mb = next(data_iterator)
        if self.routing is None:
            output = model(mb.input_ids, mb.position_ids, **self._model_inputs(mb))
            return output, partial(loss_func_factory, mb)
        chunk = self.chunks.index(model)
        done = len(self.routing.routing[chunk])
        self.routing.begin(chunk, self._replay[chunk][done] if self._replay else None)
        try:
            output = model(mb.input_ids, mb.position_ids, **self._model_inputs(mb))
        finally:
            self.routing.end(chunk)
        return output, partial(loss_func_factory, mb)

    def _rollout_routing(self, batch: SequenceBatch, micro_batches: list[MicroBatch]):
        """The engine's routing of ``batch`` (``SequenceBatch.routing``) laid out as this rank's
        recorded routing of ``micro_batches``, with the mask of the tokens it routed
        (``routing.rollout_replay``); None for a dense model or a batch without it."""
        if self.routing is None or batch.routing is None:
            return None
        model_config = unwrap_chunk(self.chunks[0]).config
        sp = model_config.sequence_parallel and model_config.tensor_model_parallel_size > 1
        return rollout_replay(
            batch.routing, micro_batches, self.routing.layer_numbers, self.spec.num_layers,
            self.spec.moe_top_k, parallel_state.get_tensor_model_parallel_world_size() if sp else 1,
            parallel_state.get_tensor_model_parallel_rank() if sp else 0)

    def _replays_rollout(self, rollout) -> bool:
        """Whether the forwards replay the engine's routing ``rollout`` (``_rollout_routing``)."""
        return rollout is not None and self.config.routing_replay == "rollout"

    def _run_schedule(self, micro_batches: list[MicroBatch], loss_func_factory, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        data = (iter(micro_batches) if len(self.chunks) == 1
                else [iter(micro_batches) for _ in self.chunks])
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, loss_func_factory),
            data_iterator=data,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=max(mb.num_tokens for mb in micro_batches),
            micro_batch_size=1,
            forward_only=forward_only,
        )

    def _broadcast_from_last_stage(self, tensors: list[torch.Tensor]) -> None:
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        for tensor in tensors:
            dist.broadcast(
                tensor, src=src, group=parallel_state.get_pipeline_model_parallel_group())

    @torch.no_grad()
    def compute_logprobs_and_entropy(self, batch: SequenceBatch) -> LogprobResult:
        """Log-prob and entropy of every response token of ``batch``, forward only, packed.

        Returns [B, R] tensors (response layout, see ``packing``) on every rank of the pipeline.
        With ``routing_replay: rollout`` a batch carrying the engine's routing is routed by it.
        """
        for chunk in self.chunks:
            chunk.eval()
        micro_batches = self.micro_batches(batch)
        if self.routing is not None:
            self.routing.reset()
            rollout = self._rollout_routing(batch, micro_batches)
            self._replay = rollout[0] if self._replays_rollout(rollout) else None

        def loss_func(mb, output):
            try:
                logp, entropy = self._logprobs(mb, output, entropy_grad=False)
            except NonFiniteError:  # NaN results: the trainer's finiteness policy decides
                logp = torch.full(mb.response_mask.shape, math.nan, device=output.device)
                entropy = logp.clone()
            return output.new_zeros(()), {"logp": logp, "entropy": entropy}

        try:
            outputs = self._run_schedule(micro_batches, loss_func, forward_only=True)
        finally:
            self._replay = None
        mask = batch.response_layout_mask().to(self.device)
        width = mask.shape[1]
        if parallel_state.is_pipeline_last_stage():
            logp = scatter_to_batch(len(batch), micro_batches, [o["logp"] for o in outputs], width)
            entropy = scatter_to_batch(
                len(batch), micro_batches, [o["entropy"] for o in outputs], width)
            if self.cp_size > 1:  # each token was scored on one CP rank, the others hold 0 there
                for tensor in (logp, entropy):
                    dist.all_reduce(tensor, group=parallel_state.get_context_parallel_group())
        else:
            logp = torch.zeros(mask.shape, dtype=self.result_dtype, device=self.device)
            entropy = torch.zeros_like(logp)
        self._broadcast_from_last_stage([logp, entropy])
        routing = self.routing.routing if self.routing is not None else None
        return LogprobResult(logp=logp, entropy=entropy, mask=mask, routing=routing)


class Actor(ModelRunner):
    """The trained policy: ``compute_logprobs_and_entropy`` and ``train_step``.

    ``model``: this rank's model chunk(s) (``load_hf_model(...).model``), built with
    ``params_dtype = config.params_dtype``; ``spec``: its ModelSpec (the true vocabulary);
    ``backend``: "te" or "local" (attention in ``models.layer_spec``).
    """

    def __init__(self, model, spec, config: ActorConfig, backend: str):
        if not isinstance(config, ActorConfig):
            raise TypeError(f"config must be an ActorConfig, got {type(config).__name__}")
        super().__init__(model, spec, config, backend)
        model_config = unwrap_chunk(self.chunks[0]).config
        if spec.is_moe and model_config.tensor_model_parallel_size > 1 and \
                not model_config.sequence_parallel:
            raise ValueError("a mixture-of-experts model at parallel.tensor > 1 trains only with "
                             "parallel.sequence_parallel=true (megatron's MoE layer refuses "
                             "tensor parallelism without it)")
        self.steps_taken = 0
        if self.on_cuda:
            self._setup_cuda()
        else:
            self.optimizer = torch.optim.AdamW(
                self._param_groups(), lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                eps=config.adam_eps, weight_decay=config.weight_decay)

    # ---------------------------------------------------------------- optimiser setup
    def _param_groups(self) -> list[dict]:
        """megatron's default grouping: no weight decay on biases and 1-D (norm) parameters."""
        decay, no_decay = [], []
        for chunk in self.chunks:
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    skip = name.endswith(".bias") or param.dim() == 1
                    (no_decay if skip else decay).append(param)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _setup_cuda(self) -> None:
        """megatron's DDP (fp32 grad reduce, distributed optimizer) and get_megatron_optimizer."""
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cfg = self.config
        settings = ddp_config()
        wrapped = []
        for index, chunk in enumerate(self.chunks):
            chunk.cuda()
            wrapped.append(DistributedDataParallel(
                config=chunk.config, ddp_config=settings, module=chunk,
                disable_bucketing=index > 0))
        self.chunks = wrapped
        for chunk in self.chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
            chunk.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 \
                else self.chunks[0].no_sync
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                clip_grad=cfg.clip_grad, bf16=cfg.params_dtype == "bfloat16",
                params_dtype=cfg.torch_params_dtype, use_distributed_optimizer=True),
            self.chunks)

    # ---------------------------------------------------------------- training
    def _zero_grads(self) -> None:
        if self.on_cuda:
            for chunk in self.chunks:
                chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if not self.on_cuda:
            for chunk in self.chunks:
                for p in chunk.parameters():
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)

    def _grad_norm(self) -> float:
        if self.on_cuda:
            self.optimizer.prepare_grads()
            return float(self.optimizer.get_grad_norm())
        return cpu_ddp.grad_norm_cpu(self.chunks)

    def _apply_update(self, lr: float, grad_norm: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.on_cuda:
            self.optimizer.step()  # megatron clips by the same global norm, then steps
            return
        if self.config.clip_grad > 0:
            coef = self.config.clip_grad / (grad_norm + 1e-6)  # megatron's clip rule
            if coef < 1.0:
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        p.grad.mul_(coef)
        self.optimizer.step()

    def train_step(self, batch: SequenceBatch, loss_fn: LossFn, *, entropy_grad: bool = False,
                   micro_batches: list[MicroBatch] | None = None, routing: list | None = None,
                   replay_routing: bool = False) -> StepResult:
        """One optimiser step on this rank's share of the step's sequences.

        ``loss_fn(micro_batch, logp, entropy)`` -> loss or (loss, metrics): ``logp`` and
        ``entropy`` are [b, R_mb] in the micro-batch's response layout (``micro_batch.
        response_mask``; ``micro_batch.gather(x)`` selects its rows of a batch-level [B, R]
        tensor such as old log-probs or advantages), the loss is the micro-batch's share of the
        step loss. ``entropy`` carries its gradient only with ``entropy_grad`` (an entropy
        bonus). ``micro_batches``: ``self.micro_batches(batch)`` when the caller already packed
        it (packing is deterministic, so it is the same). Gradients of all micro-batches
        accumulate; the global norm is clipped to ``clip_grad``; AdamW steps at the scheduled
        learning rate.

        Non-finite values: a ``NonFiniteError`` inside the schedule (non-finite logits or
        loss-function inputs) makes that micro-batch contribute a zero loss, so every stage and
        rank finishes the schedule; then one all-reduce over the job combines what each rank
        found (that, a non-finite loss, a non-finite gradient norm). If anything was found the
        step is skipped on every rank: weights, optimiser state and the schedule position stay
        unchanged, ``StepResult.skipped`` is True and ``nonfinite`` names the tensors.

        Mixture of experts (``actor.routing``): ``routing`` is a forward's recorded routing of the
        same batch (``compute_logprobs_and_entropy(batch).routing``); the share of token-layer
        pairs routed otherwise is reported, and with ``replay_routing`` every token is dispatched
        to the recorded experts (the share is then 0). A batch carrying the engine's routing
        (``SequenceBatch.routing``) is compared with it instead, at the tokens the engine routed,
        and replayed with ``routing_replay: rollout``. ``moe_metrics`` also holds the expert
        load per layer and the load-balancing loss.
        """
        if replay_routing and routing is None:
            raise ValueError("replay_routing=True needs the recorded routing")
        if micro_batches is None:
            micro_batches = self.micro_batches(batch)
        known = None
        rollout = self._rollout_routing(batch, micro_batches)
        if rollout is not None:
            if routing is not None:
                raise ValueError("train_step: routing given for a batch that carries the "
                                 "engine's routing (SequenceBatch.routing); pass routing=None")
            (routing, known), replay_routing = rollout, self._replays_rollout(rollout)
        # DDP averages over data x context parallel ranks; megatron's schedule multiplies each
        # loss by the CP size itself (forward_step_calc_loss), so the scale is over DP only
        scale = len(micro_batches) * parallel_state.get_data_parallel_world_size()
        for chunk in self.chunks:
            chunk.train()
        self._zero_grads()
        found: set[str] = set()

        def loss_func(mb, output):
            try:
                logp, entropy = self._logprobs_together(mb, output, entropy_grad)
                result = loss_fn(mb, logp, entropy)
            except NonFiniteError as error:
                found.add(error.tensor)
                return output.sum() * 0.0, {"loss": torch.zeros((), device=output.device)}
            loss, metrics = result if isinstance(result, tuple) else (result, {})
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError("loss_fn must return a scalar tensor (or (scalar, metrics))")
            if mb.labels.numel() == 0:  # nothing scored: keep the graph for the schedule
                loss = loss + output.sum() * 0.0
            return loss * scale, {"loss": loss.detach().float(), **metrics}

        if self.routing is not None:
            self.routing.reset()
            self._replay = routing if replay_routing else None
        try:
            outputs = self._run_schedule(micro_batches, loss_func, forward_only=False)
        finally:
            self._replay = None
        moe_metrics = self._moe_metrics(len(micro_batches), routing, known)
        device = self.device or torch.device("cpu")
        local = torch.zeros((), dtype=torch.float64, device=device)
        if parallel_state.is_pipeline_last_stage():
            for out in outputs:
                local += out["loss"].double()
        if not bool(torch.isfinite(local)):  # this rank's share, before the sum names nobody
            found.add("loss")
        dist.all_reduce(local,
                        group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        self._broadcast_from_last_stage([local])
        loss = local.item()
        grad_norm = self._grad_norm()
        if not math.isfinite(grad_norm):
            found.add("grad_norm")
        nonfinite = first_ranks([found])[0]  # every rank of the job skips together
        if len(nonfinite) > 1:  # a NaN forward makes the norm NaN too: report the cause
            nonfinite.pop("grad_norm", None)
        lr = self.config.lr_at(self.steps_taken)
        skipped = bool(nonfinite)
        if skipped:
            self._zero_grads()
        else:
            self._apply_update(lr, grad_norm)
            self.steps_taken += 1
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped,
                          num_micro_batches=len(micro_batches), step=self.steps_taken,
                          micro_batch_metrics=list(outputs) if outputs and not skipped else [],
                          nonfinite=nonfinite, moe_metrics=moe_metrics)

    def _moe_metrics(self, num_micro_batches: int, routing: list | None,
                     known: list | None) -> dict[str, float]:
        """The step's routing metrics (every rank takes part: all-reduces)."""
        if self.routing is None:
            return {}
        spec = self.spec
        metrics = load_metrics(self.routing.expert_counts(spec.num_layers, spec.num_experts),
                               spec.moe_layers)
        if routing is not None:
            differ, total = self.routing.mismatch(routing, known)
            metrics["moe/routing_mismatch_share"] = differ / total if total else 0.0
        metrics.update(aux_loss_metric(num_micro_batches, len(spec.moe_layers)))
        return metrics
