"""Per-GPU memory of the actor's training step, estimated from the architecture and the layout.

    python tools/memory_estimate.py              # the docs/scaling.md table (markdown)

Terms, per GPU of the pipeline stage that holds the most (GiB = 2^30 bytes):

- weights: bf16 parameters, 2 bytes each. A stage holds num_layers / pp layers, split over tp
  (norm weights, replicated, are counted whole); the embedding is on the first stage and the
  output layer on the last, each ``padded_vocab x hidden / tp`` (Megatron pads the vocabulary to
  a multiple of 128 x tp). The stage counted is the larger of the two ends.
- grads: megatron's DDP gradient buffer in fp32 (``grad_reduce_in_fp32``), 4 bytes a parameter,
  not sharded (the distributed optimizer reduce-scatters into it).
- optimizer: the distributed optimizer's fp32 main parameters and Adam m, v: 12 bytes a
  parameter, sharded over data x context parallel (dp x cp: megatron's dp_cp group).
- reference: a second bf16 copy of the weights, when the loss has a KL term and the reference
  stays on the GPU (disaggregated rollout; colocated runs offload it to CPU between uses).
- activations: one micro-batch of ``tokens`` packed tokens (the actor's token budget, one whole
  sequence at least), of which a context-parallel rank holds ``tokens / cp`` (docs/numerics.md §9: 2 cp
  chunks per sequence, two per rank), bf16, flash/fused attention (no s x s matrix), no dropout.
  Stored per token and layer, in bytes:
      2 x [4 h / s  +  (heads + 2 kv_heads) d / tp  +  heads d / tp  +  3 ffn / tp]
  with s = tp under sequence parallelism, else 1 (2 norm inputs and 2 norm outputs of width h,
  replicated over tp unless sequence parallel splits them; q, k, v; the attention output; gate
  and up projections and the SwiGLU output). With full recompute only each layer's input
  (2 h / s bytes) is kept, plus one layer's full set while it is recomputed. 1F1B pipelining keeps up to pp
  micro-batches in flight on the first stage, each over num_layers / pp layers: the same
  num_layers x per-layer total as pp = 1.
- log-prob: the last stage's logits ``tokens / cp x padded_vocab / tp`` in bf16 and their bf16
  gradient (4 bytes an element; sequence parallelism gathers the sequence before the output
  layer, so the logits are the same), plus the fp32 working set of
  ``vocab_parallel_logprobs_and_entropy``: ``min(chunk, tokens / cp) x V/tp x 4`` bytes with
  ``actor.logprob_chunk_size = chunk``, ``tokens / cp x V/tp x 4`` (a full fp32 copy) without.

Not counted: CUDA context and NCCL buffers (1-3 GiB), allocator fragmentation, a colocated SGLang
engine (its weights and KV cache are released during training), CPU memory; under context
parallelism Transformer Engine's ring keeps one layer's key/value chunk in flight
(2 x 2 x kv_heads d / tp bytes a local token, a few hundred MiB for one layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Arch:
    """A dense decoder as Megatron builds it (the fields of ``models.spec.ModelSpec``)."""

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
        """From a ``megatron_archer.models.ModelSpec``."""
        return cls(name, spec.hidden_size, spec.num_layers, spec.num_attention_heads,
                   spec.num_query_groups, spec.head_dim, spec.ffn_hidden_size, spec.vocab_size,
                   spec.tie_word_embeddings, spec.qkv_bias, spec.qk_layernorm)

    def padded_vocab(self, tp: int) -> int:
        multiple = 128 * tp
        return math.ceil(self.vocab / multiple) * multiple

    def layer_params(self, tp: int = 1) -> float:
        """Parameters of one layer on one tensor-parallel rank (replicated norms counted whole)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        split = self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.ffn
        if self.qkv_bias:
            split += q + 2 * kv
        replicated = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return split / tp + replicated

    def parameters(self) -> int:
        """Total parameters with the true vocabulary: what ``sum(p.numel())`` of the HF model gives."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return int(self.layers * self.layer_params() + embeddings + self.hidden)


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
    reference: bool = False         # a resident bf16 reference model


def stage_params(arch: Arch, layout: Layout) -> float:
    """Parameters on one GPU of the fuller pipeline end (first: embedding; last: output layer)."""
    layers = arch.layers / layout.pp * arch.layer_params(layout.tp)
    table = arch.padded_vocab(layout.tp) * arch.hidden / layout.tp
    if layout.pp == 1:
        return layers + table * (1 if arch.tied else 2) + arch.hidden
    return layers + table + arch.hidden  # last stage: final norm and output layer


def activation_bytes_per_token_layer(arch: Arch, tp: int, sp: bool = False) -> float:
    d, h, s = arch.head_dim, arch.hidden, tp if sp else 1
    return 2 * (4 * h / s + (arch.heads + 2 * arch.kv_heads) * d / tp + arch.heads * d / tp
                + 3 * arch.ffn / tp)


def estimate(arch: Arch, layout: Layout) -> dict[str, float]:
    """The terms of the module docstring, in GiB, and their ``total``."""
    if layout.sp and layout.tp == 1:
        raise ValueError("sequence parallelism needs tp > 1")
    params = stage_params(arch, layout)
    tokens = layout.tokens / layout.cp  # this context-parallel rank's share of the micro-batch
    per_layer = activation_bytes_per_token_layer(arch, layout.tp, layout.sp) * tokens
    if layout.recompute:
        stored_input = 2 * arch.hidden / (layout.tp if layout.sp else 1)
        activations = arch.layers * stored_input * tokens + per_layer
    else:
        activations = arch.layers * per_layer
    vocab_local = arch.padded_vocab(layout.tp) / layout.tp
    working = min(layout.chunk or tokens, tokens) * vocab_local * 4
    terms = {
        "weights": 2 * params,
        "grads": 4 * params,
        "optimizer": 12 * params / (layout.dp * layout.cp),
        "reference": 2 * params if layout.reference else 0.0,
        "activations": activations,
        "logits": tokens * vocab_local * 4,
        "logprob_work": working,
    }
    terms = {k: v / GIB for k, v in terms.items()}
    terms["total"] = sum(terms.values())
    return terms


# Published config.json values (Hugging Face hub), all with vocab 151936 and untied embeddings.
MODELS = {
    "R1-Distill-Qwen-1.5B": Arch("R1-Distill-Qwen-1.5B", 1536, 28, 12, 2, 128, 8960, 151936,
                                 qkv_bias=True),
    "Qwen3-8B": Arch("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, qk_norm=True),
    "Qwen3-14B": Arch("Qwen3-14B", 5120, 40, 40, 8, 128, 17408, 151936, qk_norm=True),
    "Qwen3-32B": Arch("Qwen3-32B", 5120, 64, 64, 8, 128, 25600, 151936, qk_norm=True),
}

# The examples/scale layouts: (model, layout) per row; tokens = max prompt + max response.
TABLE = [
    ("R1-Distill-Qwen-1.5B", Layout(tp=1, pp=1, dp=8, tokens=18432, chunk=4096)),
    ("R1-Distill-Qwen-1.5B", Layout(tp=1, pp=1, dp=8, tokens=18432)),
    ("Qwen3-8B", Layout(tp=4, pp=1, dp=4, tokens=24576, chunk=4096)),
    ("Qwen3-8B", Layout(tp=4, pp=1, dp=4, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-14B", Layout(tp=8, pp=1, dp=2, tokens=24576, chunk=4096)),
    ("Qwen3-14B", Layout(tp=8, pp=1, dp=2, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=2, tokens=24576, chunk=4096)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=2, tokens=24576, chunk=4096, recompute=True)),
    # long responses (docs/numerics.md §9): context parallel 2 on the same 32 GPUs, 20480-token responses
    # (tokens 24576) and 29k (tokens 32768); the config adds sequence parallelism to recompute
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, tokens=32768, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=24576, chunk=4096,
                         recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=32768, chunk=4096,
                         recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=24576, chunk=4096)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=32768, chunk=4096)),
]


def markdown(rows=TABLE) -> str:
    head = ("| model | params | tp | pp | dp | cp | sp | tokens | recompute | chunk | weights | "
            "grads | optimizer | reference | activations | logits | log-prob work | total GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, layout in rows:
        arch, t = MODELS[name], estimate(MODELS[name], layout)
        lines.append(
            f"| {name} | {arch.parameters() / 1e9:.2f}B | {layout.tp} | {layout.pp} | {layout.dp} "
            f"| {layout.cp} | {'yes' if layout.sp else 'no'} | {layout.tokens} "
            f"| {'yes' if layout.recompute else 'no'} | {layout.chunk or 'none'} "
            f"| {t['weights']:.1f} | {t['grads']:.1f} | {t['optimizer']:.1f} | {t['reference']:.1f} "
            f"| {t['activations']:.1f} | {t['logits']:.1f} | {t['logprob_work']:.1f} "
            f"| {t['total']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
