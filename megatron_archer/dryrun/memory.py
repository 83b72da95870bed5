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
from dataclasses import dataclass

GIB = 1 << 30
OPTIMIZER_BYTES_BF16 = 12  # fp32 main parameter + Adam m + v, per element of the shard
OPTIMIZER_BYTES_FP32 = 8   # Adam m + v: fp32 parameters are their own main copy


def optimizer_bytes(param_bytes: int) -> int:
    """Optimizer bytes an element of the shard for parameters of ``param_bytes`` bytes."""
    return OPTIMIZER_BYTES_BF16 if param_bytes < 4 else OPTIMIZER_BYTES_FP32


@dataclass(frozen=True)
class Arch:
    """A dense decoder as megatron builds it (the fields of ``models.spec.ModelSpec``)."""

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

    @classmethod
    def from_spec(cls, spec, name: str = "model") -> Arch:
        """From a ``megatron_archer.models.ModelSpec``; a mixture-of-experts model is refused
        (its experts, router and token dispatch are not modelled here)."""
        if spec.is_moe:
            raise ValueError(f"{spec.architecture} is a mixture-of-experts model "
                             f"({spec.num_experts} experts), which the memory model and the "
                             "weight-sync plan do not model yet (dense decoders only)")
        return cls(name, spec.hidden_size, spec.num_layers, spec.num_attention_heads,
                   spec.num_query_groups, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size,
                   spec.tie_word_embeddings, spec.qkv_bias, spec.qk_layernorm)

    def padded_vocab(self, tp: int) -> int:
        multiple = 128 * tp
        return math.ceil(self.vocab / multiple) * multiple

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one layer on one tensor-parallel rank (replicated norms counted whole)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        split = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        if self.qkv_bias:
            split += q + 2 * kv
        if split % tp:
            raise ValueError(f"{self.name}: a layer's {split} sharded parameters do not split "
                             f"over tensor parallel {tp}")
        replicated = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return split // tp + replicated

    def parameters(self) -> int:
        """Total parameters with the true vocabulary: what ``sum(p.numel())`` of the HF model gives."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.hidden


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


def stage_params(arch: Arch, layout: Layout, stage: int) -> int:
    """Parameters on one GPU of pipeline stage ``stage`` (first: embedding; last: final norm and
    output layer, or with tied embeddings under pp > 1 megatron's copy of the embedding)."""
    if arch.layers % layout.pp:
        raise ValueError(f"{arch.name}: {arch.layers} layers do not split over pp {layout.pp}")
    params = arch.layers // layout.pp * arch.layer_params(layout.tp)
    table = arch.padded_vocab(layout.tp) * arch.hidden // layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        params += table
    if last:
        params += arch.hidden + (table if not (first and arch.tied) else 0)
    return params


def fuller_stage(arch: Arch, layout: Layout) -> int:
    """The pipeline stage holding the most parameters (the first of equals)."""
    counts = [stage_params(arch, layout, s) for s in range(layout.pp)]
    return counts.index(max(counts))


def largest_shard(params: int, dp_cp: int) -> int:
    """Elements of the largest distributed-optimizer shard of a one-bucket buffer of ``params``
    (megatron pads the bucket to a multiple of lcm(dp_cp, 128) and cuts it in dp_cp parts)."""
    if dp_cp == 1:
        return params
    multiple = math.lcm(dp_cp, 128)
    padded = math.ceil(params / multiple) * multiple
    return min(params, padded // dp_cp)


def activation_bytes_per_token_layer(arch: Arch, tp: int, sp: bool = False) -> float:
    d, h, s = arch.head_dim, arch.hidden, tp if sp else 1
    return 2 * (4 * h / s + (arch.heads + 2 * arch.kv_heads) * d / tp + arch.heads * d / tp
                + 3 * arch.ffn / tp)


def activation_bytes(arch: Arch, layout: Layout, layers: int, in_flight: int) -> float:
    """Stored activations of ``in_flight`` micro-batches over ``layers`` layers on one rank."""
    tokens = layout.tokens / layout.cp
    per_layer = activation_bytes_per_token_layer(arch, layout.tp, layout.sp) * tokens
    if layout.recompute:
        stored_input = 2 * arch.hidden / (layout.tp if layout.sp else 1)
        return in_flight * layers * stored_input * tokens + per_layer
    return in_flight * layers * per_layer


def logit_bytes(tokens: float, vocab_local: int, chunk: int | None,
                fused: bool = False) -> tuple[float, float]:
    """(logits and their gradient, the log-prob op's fp32 working set) on a last-stage rank
    holding ``tokens`` of the micro-batch and ``vocab_local`` rows of the output layer."""
    logits = 0.0 if fused else tokens * vocab_local * 4
    return logits, min(chunk or tokens, tokens) * vocab_local * 4


def estimate(arch: Arch, layout: Layout) -> dict[str, float]:
    """The terms of the module docstring, in bytes, for a GPU of the fuller pipeline stage (with
    the first stage's activations and the last stage's logits: an upper bound), and ``total``."""
    if layout.sp and layout.tp == 1:
        raise ValueError("sequence parallelism needs tp > 1")
    params = stage_params(arch, layout, fuller_stage(arch, layout))
    logits, working = logit_bytes(layout.tokens / layout.cp, arch.padded_vocab(layout.tp) // layout.tp,
                                  layout.chunk, layout.fused_logprobs)
    terms = {
        "weights": float(layout.param_bytes * params),
        "grads": 4.0 * params,
        "optimizer": float(optimizer_bytes(layout.param_bytes)
                           * largest_shard(params, layout.dp * layout.cp)),
        "reference": float(layout.param_bytes * params) if layout.reference else 0.0,
        "activations": activation_bytes(arch, layout, arch.layers // layout.pp, layout.pp),
        "logits": logits,
        "logprob_work": working,
    }
    terms["total"] = sum(terms.values())
    return terms
