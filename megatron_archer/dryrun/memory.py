"""The memory model of the actor's training step: arithmetic on a model's shapes and a layout.

``megatron-archer plan`` feeds it the shapes of the stage it built (its layers, its vocabulary
shard); ``tools/memory_estimate.py`` feeds it published shapes for its table. Bytes throughout.

Static terms (exact for what megatron allocates, checked against ``plan``'s built buffers):

- weights: the parameters in ``actor.params_dtype`` (2 bytes a parameter in bf16). A stage holds
  num_layers / pp layers, split over tp (norm weights, replicated, whole); the embedding is on
  the first stage and the output layer on the last, each ``padded_vocab x hidden / tp`` rows
  (megatron pads the vocabulary to a multiple of 128 x tp).
- grads: megatron's DDP gradient buffer in fp32 (``grad_reduce_in_fp32``), 4 bytes a parameter,
  not sharded (the distributed optimizer reduce-scatters into it).
- optimizer: the distributed optimizer's fp32 main parameters and Adam m, v: 12 bytes an element
  of this rank's shard of the buffer (8 when the parameters are fp32 already), the buffer being
  cut into dp x cp equal shards (megatron's dp_cp group) after padding to a multiple of
  lcm(dp x cp, 128) elements; the largest shard is ``ceil(params / that) x that / (dp x cp)``.
  megatron also starts each parameter at a multiple of 64 elements, which is not modelled here:
  it adds nothing when every parameter's size is a multiple of 64 (every examples/scale model),
  and ``plan`` reports the padding of the buffers it builds.
- reference: a second copy of the weights when the loss has a KL term and the reference stays
  on the GPU (disaggregated rollout; colocated runs offload it to CPU between uses).
- mixture of experts: a layer with experts has, instead of the dense MLP, a router (num_experts x
  h, replicated over tp, so whole on every rank) and num_experts SwiGLU experts of 3 h x
  moe_ffn parameters each, num_experts / ep of them on a rank (expert parallel), each split over
  etp (expert-tensor parallel, default tp). The experts are megatron's second DDP buffer (its
  ``expert_parallel_buffers``): weights and grads as above, and the distributed optimizer
  shards it over the expert-data-parallel group, edp = tp x cp x dp / (etp x ep) ranks (the
  world over etp x ep x pp), while the dense buffer is sharded over dp x cp as before.

Estimated terms (not measured; the formulas below, from the model's shapes):

- activations: one micro-batch of ``tokens`` packed tokens (the actor's token budget), of which
  a context-parallel rank holds ``tokens / cp`` (docs/numerics.md §9), bf16, flash/fused
  attention (no s x s matrix), no dropout. Stored per token and layer, in bytes:
      2 x [4 h / s  +  (heads + 2 kv_heads) d / tp  +  heads d / tp  +  3 ffn / tp]
  with s = tp under sequence parallelism, else 1 (2 norm inputs and 2 norm outputs of width h;
  q, k, v; the attention output; gate and up projections and the SwiGLU output). With full
  recompute only each layer's input (2 h / s bytes) is kept, plus one layer's full set while it
  is recomputed. 1F1B pipelining keeps up to pp - stage micro-batches in flight on a stage, each
  over its num_layers / pp layers: on the first stage the same num_layers x per-layer total as
  pp = 1. Selective recompute is counted as none (with flash attention it saves little).
  A layer with experts stores, per token, the attention part as above and in place of
  ``3 ffn / tp``: the router's fp32 softmax scores and its bool routing map (5 E bytes, E =
  num_experts, over the rank's tokens, tokens / s) and, per routed copy (top_k a token, received
  by this rank's experts through the all-to-all, then gathered over etp, so with balanced
  routing top_k x etp copies per token of the rank's tokens / s), the first expert linear's input
  (h) and output (2 moe_ffn / etp) and the SwiGLU output (moe_ffn / etp), in bf16:
      5 E / s  +  2 top_k etp (h + 3 moe_ffn / etp) / s
  Balanced routing is assumed: an expert that draws more than its share (the load-balancing loss
  keeps that small, but nothing bounds it) stores proportionally more.
- dispatch: the alltoall token dispatcher's buffers of the layer in flight (once a rank, not per
  layer): the permuted copy of the rank's tokens (top_k h a token) and the all-to-all output
  gathered over etp (top_k etp h), both alive before the experts' sort, in bf16:
      2 top_k h (1 + etp) / s  bytes a token; counted into ``activations``.
- logits: the last stage's ``tokens / cp x padded_vocab / tp`` logits in bf16 and their bf16
  gradient (4 bytes an element; sequence parallelism gathers the sequence before the output
  layer, so the logits are the same); none with ``actor.logprob_impl: fused``.
- log-prob work: the fp32 working set of the vocab-parallel op, ``min(chunk, tokens / cp) x
  V/tp x 4`` bytes with ``actor.logprob_chunk_size = chunk``.

Not counted: CUDA context and NCCL buffers (1-3 GiB), allocator fragmentation, a colocated SGLang
engine (its weights and KV cache are released during training), CPU memory; under context
parallelism Transformer Engine's ring keeps one layer's key/value chunk in flight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GIB = 1 << 30
OPTIMIZER_BYTES_BF16 = 12  # fp32 main parameter + Adam m + v, per element of the shard
OPTIMIZER_BYTES_FP32 = 8   # Adam m + v: fp32 parameters are their own main copy


def optimizer_bytes(param_bytes: int) -> int:
    """Optimizer bytes an element of the shard for parameters of ``param_bytes`` bytes."""
    return OPTIMIZER_BYTES_BF16 if param_bytes < 4 else OPTIMIZER_BYTES_FP32


@dataclass(frozen=True)
class Arch:
    """A decoder as megatron builds it (the fields of ``models.spec.ModelSpec``); ``experts`` > 0
    makes the layers in ``moe_layers`` mixtures of ``experts`` SwiGLU experts of ``moe_ffn``,
    ``top_k`` of them a token."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 0
    top_k: int = 0
    moe_ffn: int = 0
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_spec(cls, spec, name: str = "model") -> Arch:
        """From a ``megatron_archer.models.ModelSpec``."""
        return cls(name, spec.hidden_size, spec.num_layers, spec.num_attention_heads,
                   spec.num_query_groups, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size,
                   spec.tie_word_embeddings, spec.qkv_bias, spec.qk_layernorm, spec.num_experts,
                   spec.moe_top_k, spec.moe_ffn_hidden_size, tuple(spec.moe_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def padded_vocab(self, tp: int) -> int:
        multiple = 128 * tp
        return math.ceil(self.vocab / multiple) * multiple

    def layer_params(self, tp: int = 1, moe: bool = False) -> int:
        """Parameters of one layer on one tensor-parallel rank outside its experts (replicated
        norms counted whole): attention, norms and the dense MLP, or with ``moe`` the router
        (experts x hidden, replicated)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        split = self.hidden * (q + 2 * kv) + q * self.hidden
        if not moe:
            split += 3 * self.hidden * self.ffn
        if self.qkv_bias:
            split += q + 2 * kv
        if split % tp:
            raise ValueError(f"{self.name}: a layer's {split} sharded parameters do not split "
                             f"over tensor parallel {tp}")
        replicated = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        if moe:
            replicated += self.experts * self.hidden
        return split // tp + replicated

    def expert_params(self, ep: int = 1, etp: int = 1) -> int:
        """Expert parameters of one mixture-of-experts layer on one rank: experts / ep experts
        of 3 hidden x moe_ffn (gate, up, down), each split over etp."""
        if self.experts % ep or self.moe_ffn % etp:
            raise ValueError(f"{self.name}: {self.experts} experts of {self.moe_ffn} do not split "
                             f"over expert parallel {ep} x expert-tensor parallel {etp}")
        return self.experts // ep * 3 * self.hidden * (self.moe_ffn // etp)

    def parameters(self, active: bool = False) -> int:
        """Total parameters with the true vocabulary: what ``sum(p.numel())`` of the HF model
        gives; with ``active``, those one token uses (top_k of each layer's experts)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        moe = len(self.moe_layers)
        routed = self.top_k if active else self.experts
        experts = moe * routed * 3 * self.hidden * self.moe_ffn
        return ((self.layers - moe) * self.layer_params() + moe * self.layer_params(moe=True)
                + experts + embeddings + self.hidden)


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1                     # parallel.context
    sp: bool = False                # sequence parallelism (needs tp > 1)
    tokens: int = 4096              # actor.max_tokens_per_micro_batch (before the CP split)
    recompute: bool = False
    chunk: int | None = None        # actor.logprob_chunk_size
    reference: bool = False         # a resident reference model
    param_bytes: int = 2            # actor.params_dtype: 2 for bf16, 4 for fp32
    fused_logprobs: bool = False    # actor.logprob_impl: fused (no logits)
    ep: int = 1                     # parallel.expert
    etp: int | None = None          # parallel.expert_tensor (None: tp)

    @property
    def expert_tensor(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def expert_data(self) -> int:
        """The expert-data-parallel size: a stage's tp x cp x dp ranks over etp x ep."""
        ranks, experts = self.tp * self.cp * self.dp, self.expert_tensor * self.ep
        if ranks % experts:
            raise ValueError(f"expert-tensor {self.expert_tensor} x expert {self.ep} parallel "
                             f"does not divide a stage's tp x cp x dp = {ranks} ranks")
        return ranks // experts


def stage_layers(arch: Arch, layout: Layout, stage: int) -> range:
    """Global indices of the layers of pipeline stage ``stage``."""
    if arch.layers % layout.pp:
        raise ValueError(f"{arch.name}: {arch.layers} layers do not split over pp {layout.pp}")
    per_stage = arch.layers // layout.pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_params(arch: Arch, layout: Layout, stage: int) -> tuple[int, int]:
    """(parameters outside the experts, expert parameters) on one GPU of pipeline stage
    ``stage`` (first: embedding; last: final norm and output layer, or with tied embeddings
    under pp > 1 megatron's copy of the embedding): megatron's two DDP buffers."""
    layers = stage_layers(arch, layout, stage)
    moe = sum(arch.is_moe_layer(i) for i in layers)
    dense = ((len(layers) - moe) * arch.layer_params(layout.tp)
             + moe * arch.layer_params(layout.tp, moe=True))
    experts = moe * arch.expert_params(layout.ep, layout.expert_tensor) if moe else 0
    table = arch.padded_vocab(layout.tp) * arch.hidden // layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        dense += table
    if last:
        dense += arch.hidden + (table if not (first and arch.tied) else 0)
    return dense, experts


def fuller_stage(arch: Arch, layout: Layout) -> int:
    """The pipeline stage holding the most parameters (the first of equals)."""
    counts = [sum(stage_params(arch, layout, s)) for s in range(layout.pp)]
    return counts.index(max(counts))


def largest_shard(params: int, dp_cp: int) -> int:
    """Elements of the largest distributed-optimizer shard of a one-bucket buffer of ``params``
    (megatron pads the bucket to a multiple of lcm(dp_cp, 128) and cuts it in dp_cp parts)."""
    if dp_cp == 1:
        return params
    multiple = math.lcm(dp_cp, 128)
    padded = math.ceil(params / multiple) * multiple
    return min(params, padded // dp_cp)


def activation_bytes_per_token_layer(arch: Arch, tp: int, sp: bool = False, moe: bool = False,
                                     etp: int | None = None) -> float:
    """Stored bytes a token of the micro-batch and a layer (module docstring); ``moe``: a layer
    with experts, split over expert-tensor parallel ``etp`` (None: tp)."""
    d, h, s = arch.head_dim, arch.hidden, tp if sp else 1
    attention = 2 * (4 * h / s + (arch.heads + 2 * arch.kv_heads) * d / tp + arch.heads * d / tp)
    if not moe:
        return attention + 2 * 3 * arch.ffn / tp
    etp = tp if etp is None else etp
    router = 5 * arch.experts / s  # fp32 scores (4 E) and bool routing map (E)
    # top_k x etp copies a token of this rank's tokens / s: fc1 input, fc1 output, SwiGLU output
    experts = 2 * arch.top_k * etp * (h + 3 * arch.moe_ffn / etp) / s
    return attention + router + experts


def dispatch_bytes_per_token(arch: Arch, tp: int, sp: bool = False, etp: int | None = None) -> float:
    """The alltoall dispatcher's buffers a token of the micro-batch (module docstring): the
    permuted copy and the all-to-all output gathered over etp, bf16, of the layer in flight."""
    etp = tp if etp is None else etp
    return 2 * arch.top_k * arch.hidden * (1 + etp) / (tp if sp else 1)


def activation_bytes(arch: Arch, layout: Layout, layers: Sequence[int], in_flight: int) -> float:
    """Stored activations of ``in_flight`` micro-batches over the global layers ``layers`` on
    one rank, with the dispatcher's buffers of the one layer in flight when any has experts."""
    tokens = layout.tokens / layout.cp
    per_layer = [activation_bytes_per_token_layer(arch, layout.tp, layout.sp, arch.is_moe_layer(i),
                                                  layout.expert_tensor) * tokens for i in layers]
    dispatch = 0.0
    if any(arch.is_moe_layer(i) for i in layers):
        dispatch = dispatch_bytes_per_token(arch, layout.tp, layout.sp, layout.expert_tensor) * tokens
    if layout.recompute:
        stored_input = 2 * arch.hidden / (layout.tp if layout.sp else 1)
        return in_flight * len(per_layer) * stored_input * tokens + max(per_layer, default=0.0) + dispatch
    return in_flight * sum(per_layer) + dispatch


def logit_bytes(tokens: float, vocab_local: int, chunk: int | None,
                fused: bool = False) -> tuple[float, float]:
    """(logits and their gradient, the log-prob op's fp32 working set) on a last-stage rank
    holding ``tokens`` of the micro-batch and ``vocab_local`` rows of the output layer."""
    logits = 0.0 if fused else tokens * vocab_local * 4
    return logits, min(chunk or tokens, tokens) * vocab_local * 4


def check_layout(arch: Arch, layout: Layout) -> None:
    """The layout rules the terms rely on, as the job enforces them (one line each)."""
    if layout.sp and layout.tp == 1:
        raise ValueError("sequence parallelism needs tp > 1")
    if arch.experts == 0 and (layout.ep > 1 or layout.expert_tensor != layout.tp):
        raise ValueError(f"{arch.name} has no experts: expert parallel {layout.ep} and "
                         f"expert-tensor parallel {layout.expert_tensor} need a "
                         "mixture-of-experts model")
    if arch.experts and layout.tp > 1 and not layout.sp:
        raise ValueError("a mixture-of-experts model at tensor parallel > 1 trains only with "
                         "sequence parallelism (parallel.sequence_parallel; megatron's MoE layer "
                         "refuses tensor parallelism without it)")


def estimate(arch: Arch, layout: Layout) -> dict[str, float]:
    """The terms of the module docstring, in bytes, for a GPU of the fuller pipeline stage (with
    the first stage's activations and the last stage's logits: an upper bound), and ``total``."""
    check_layout(arch, layout)
    dense, experts = stage_params(arch, layout, fuller_stage(arch, layout))
    params = dense + experts
    logits, working = logit_bytes(layout.tokens / layout.cp, arch.padded_vocab(layout.tp) // layout.tp,
                                  layout.chunk, layout.fused_logprobs)
    # the dense buffer is sharded over dp x cp, the experts' over the expert-data-parallel group
    shard = largest_shard(dense, layout.dp * layout.cp)
    if experts:
        shard += largest_shard(experts, layout.expert_data)
    terms = {
        "weights": float(layout.param_bytes * params),
        "grads": 4.0 * params,
        "optimizer": float(optimizer_bytes(layout.param_bytes) * shard),
        "reference": float(layout.param_bytes * params) if layout.reference else 0.0,
        "activations": activation_bytes(arch, layout, stage_layers(arch, layout, 0), layout.pp),
        "logits": logits,
        "logprob_work": working,
    }
    terms["total"] = sum(terms.values())
    return terms
