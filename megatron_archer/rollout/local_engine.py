"""The embedded rollout engine: a transformers causal LM, batched sampling with a KV cache.

All prompts x ``n`` samples decode as one left-padded batch. Each prompt's forward (the prefill,
most of a short rollout's work) runs once, and its KV cache and last logits are repeated for its
``n`` rows: the same arithmetic as prefilling every row, up to float rounding (the matmuls see
fewer rows; log-probs within ~1e-6 on CPU, tokens equal in the tests). The weights come from
a Hugging Face checkpoint at start and from the actor's exported buckets afterwards
(``update_weights``). With ``record_routing`` (a mixture-of-experts model) every sample carries
the experts each of its tokens was routed to in the engine's own forwards (``Sample.routing``):
the prompt's in the prefill, each response token's in the decode step that ran it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import transformers

from megatron_archer.rollout.engine import (
    MEMORY_PARTS,
    Bucket,
    RolloutEngine,
    Sample,
    SamplingParams,
    check_prompts,
)
from megatron_archer.rollout.sampling import sample_step

# fp32 elements of one sampling chunk: sample_step makes a few fp32 [rows, V] copies, so rows are
# sampled in chunks of SAMPLE_CHUNK_ELEMENTS // V (441 rows, 256 MiB a copy, at V = 151,936)
SAMPLE_CHUNK_ELEMENTS = 1 << 26


def _sample_rows(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """``sample_step`` over row chunks of ``logits`` [B, V] (the prefill keeps only the last
    position's logits, ``logits_to_keep=1``: [B, prompt_len, V] in fp32 would not fit at
    V = 151,936)."""
    rows = max(1, SAMPLE_CHUNK_ELEMENTS // logits.shape[-1])
    parts = [sample_step(chunk, params, generator) for chunk in logits.split(rows)]
    return tuple(torch.cat(values) for values in zip(*parts))


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


@contextmanager
def torch_threads(count: int | None):
    """torch's intra-op thread count set to ``count`` inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# a mixture-of-experts checkpoint's per-expert tensor, as buckets and checkpoints name it
_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def _target(params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The parameter an HF tensor ``name`` writes, or None. transformers keeps a Qwen3-MoE
    layer's experts stacked in memory (``experts.gate_up_proj`` [E, 2I, H] with [gate; up] per
    expert, ``experts.down_proj`` [E, H, I]) while checkpoints and buckets name each expert's
    matrix: those names write their view of the stacked parameter."""
    if name in params:
        return params[name]
    match = _EXPERT.match(name)
    if match is None:
        return None
    prefix, expert, kind = match.group(1), int(match.group(2)), match.group(3)
    stacked = params.get(f"{prefix}.{'down_proj' if kind == 'down' else 'gate_up_proj'}")
    if stacked is None or expert >= stacked.shape[0]:
        return None
    if kind == "down":
        return stacked[expert]
    gate, up = stacked[expert].chunk(2, dim=0)
    return gate if kind == "gate" else up


class _RoutingRecorder:
    """Forward hooks on the routers of a transformers mixture-of-experts model (each MoE layer's
    ``mlp.gate``, which returns (logits, weights, expert indices)): inside ``record`` the experts
    of every token of one forward, [tokens, num_layers, top_k] int16, sorted (dense layers 0)."""

    def __init__(self, model):
        config = model.config
        self.num_layers, self.top_k = config.num_hidden_layers, config.num_experts_per_tok
        self._current: dict[int, torch.Tensor] | None = None
        routers = [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers)
                   if hasattr(layer.mlp, "experts")]
        if not routers:
            raise ValueError("LocalEngine record_routing=True: the model has no MoE layer")
        for index, gate in routers:
            gate.register_forward_hook(partial(self._hook, index))

    def _hook(self, index, module, inputs, output) -> None:
        if self._current is not None:
            self._current[index] = output[2]

    def record(self, forward):
        """``forward()``'s result and the routing of its tokens (batch-major, as flattened)."""
        self._current = {}
        try:
            out = forward()
            layers = self._current
        finally:
            self._current = None
        tokens = next(iter(layers.values())).shape[0]
        experts = torch.zeros(tokens, self.num_layers, self.top_k, dtype=torch.int16)
        for index, chosen in layers.items():
            experts[:, index] = chosen.sort(dim=-1).values.cpu().to(torch.int16)
        return out, experts


def _full_sdpa_attention(config) -> bool:
    """Whether every attention layer of a transformers model is full (causal, no sliding window
    or chunks) under SDPA: then a decode step's padding mask is its whole attention mask."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or not getattr(
        config, "use_sliding_window", True)


class LocalEngine(RolloutEngine):
    """A transformers model on ``device`` in ``dtype`` (float32 for exact log-probs on CPU).

    On CPU, generation runs on ``threads`` torch threads, by default every core of the process
    (``cpu_cores``), whatever the thread count outside: under ``torchrun`` each process gets one
    thread, and while global rank 0 generates the other ranks sleep in the rank-zero broadcast
    (a blocking gloo wait, no spinning), so their cores would otherwise idle. The thread count
    changes only the summation order inside matmuls: tokens and log-probs for a fixed seed are
    today's up to float rounding (tested: equal tokens, log-probs within 1e-5).
    ``record_routing``: samples carry their routing (module docstring).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
        record_routing: bool = False,
    ):
        self.device = torch.device(device)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"LocalEngine threads={threads!r}: expected a positive integer or "
                             f"None (every core)")
        self.threads = None if self.device.type != "cpu" else threads or cpu_cores()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            checkpoint_dir, dtype=dtype
        ).to(self.device)
        self.model.eval()
        self._recorder = _RoutingRecorder(self.model) if record_routing else None
        self._prepared_mask = _full_sdpa_attention(self.model.config)
        self._version: int | None = None
        self._released = False

    @property
    def weight_version(self) -> int | None:
        return self._version

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """All buckets or none: every tensor is checked (name known, shape equal, values finite
        in the model's dtype) and staged as a copy on the model's device; the model changes only
        once every bucket has passed, so a failed update leaves the model and ``weight_version``
        as they were. Trade-off: while it runs, the update holds a second copy of the weights it
        carries (fine for this CPU / small-model engine; SGLangEngine serves large models).
        A tied ``lm_head`` follows its embedding."""
        self._check_usable()
        params = dict(self.model.named_parameters())
        staged = []
        for bucket in buckets:
            for name, tensor in bucket:
                target = _target(params, name)
                staged.append((target, self._staged(target, name, tensor, version)))
        for target, tensor in staged:
            target.copy_(tensor)
        self._version = version

    @staticmethod
    def _staged(param: torch.Tensor | None, name: str, tensor: torch.Tensor,
                version: int) -> torch.Tensor:
        """``tensor`` copied to its parameter's device and dtype, if it fits the parameter."""
        where = f"update_weights (version {version}): {name}"
        if param is None:
            raise KeyError(f"{where} is not a parameter of the model")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{where} has shape {list(tensor.shape)}, the model parameter {list(param.shape)}"
            )
        staged = tensor.detach().to(device=param.device, dtype=param.dtype, copy=True)
        if not torch.isfinite(staged).all():
            raise ValueError(f"{where} holds non-finite values (in {param.dtype})")
        return staged

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        with torch_threads(self.threads), torch.no_grad():
            return self._generate(prompts, params)

    def _generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                  ) -> list[list[Sample]]:
        self._check_usable()
        check_prompts(prompts)
        vocab = self.model.config.vocab_size
        rows = [list(p) for p in prompts for _ in range(params.n)]
        if max(max(r) for r in rows) >= vocab:
            raise ValueError(f"a prompt holds a token id >= vocab_size {vocab}")
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)

        cache, logits, prompt_mask, routing = self._prefill(prompts, params.n)
        stop = torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        # the attention mask of every step, preallocated: step k writes column width + k in place
        width = prompt_mask.shape[1]
        mask = prompt_mask.new_zeros(len(rows), width + params.max_new_tokens)
        mask[:, :width] = prompt_mask
        length = prompt_mask.sum(-1)  # each row's unmasked tokens: the next position is length - 1
        out_tokens, out_logp, out_temp, out_stopped, out_routing = [], [], [], [], []
        for step in range(params.max_new_tokens):
            tokens, logp, temps = _sample_rows(logits[:, :vocab], params, generator)
            stopped = torch.isin(tokens, stop) & ~done
            out_tokens.append(tokens), out_logp.append(logp), out_temp.append(temps)
            out_stopped.append(stopped)
            done |= stopped
            if done.all() or step == params.max_new_tokens - 1:
                break
            mask[:, width + step] = ~done
            length += ~done
            out, experts = self._forward(partial(
                self.model, input_ids=tokens[:, None],
                attention_mask=self._decode_mask(mask[:, : width + step + 1]),
                position_ids=(length - 1).clamp(min=0)[:, None],
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            ))  # fmt: skip
            out_routing.append(experts)
            cache, logits = out.past_key_values, out.logits[:, -1]
        samples = self._samples(rows, params.n, out_tokens, out_logp, out_temp, out_stopped)
        if routing is None:
            return samples
        return [[replace(s, routing=torch.cat([routing[i * params.n + j]] + [
            step[i * params.n + j][None] for step in out_routing[:len(s.token_ids) - 1]]))
                 for j, s in enumerate(group)] for i, group in enumerate(samples)]

    def _decode_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The attention mask of a one-token decode step given its 2D padding mask [B, L]:
        where every layer is full SDPA attention, the 4D boolean mask [B, 1, 1, L] that
        transformers would build from it (the step's query attends every unpadded key, so the
        causal part is all true), or None where nothing is padded (transformers then passes no
        mask either). Handing it over skips transformers' mask construction each step (a few
        percent of a tiny model's rollout); other models get the 2D mask (``_prepared_mask``)."""
        if not self._prepared_mask:
            return mask
        return None if bool(mask.all()) else mask.bool()[:, None, None, :]

    def _forward(self, forward):
        """``forward()``'s result, and with ``record_routing`` its tokens' routing (else None)."""
        if self._recorder is None:
            return forward(), None
        return self._recorder.record(forward)

    def _prefill(self, prompts: Sequence[Sequence[int]], n: int):
        """The prompts' forward, once per prompt, left-padded (every row's next token is at the
        end): the KV cache, the last position's logits and the attention mask, each repeated for
        the prompt's ``n`` rows (prompt-major, as the samples are returned), and with
        ``record_routing`` each row's prompt routing [prompt tokens, layers, k] (else None)."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(list(prompt))
            mask[i, width - len(prompt):] = 1
        out, experts = self._forward(partial(
            self.model, input_ids=ids, attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, logits_to_keep=1))
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        routing = None
        if experts is not None:
            experts = experts.view(len(prompts), width, *experts.shape[1:])
            routing = [experts[i, width - len(p):] for i, p in enumerate(prompts) for _ in range(n)]
        return (cache, out.logits[:, -1].repeat_interleave(n, 0), mask.repeat_interleave(n, 0),
                routing)

    @staticmethod
    def _samples(rows, n, tokens, logps, temps, stops) -> list[list[Sample]]:
        tokens, logps = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()
        temps, stops = torch.stack(temps, 1).tolist(), torch.stack(stops, 1)
        samples = []
        for i in range(len(rows)):
            hit = stops[i].nonzero()
            end = int(hit[0]) + 1 if len(hit) else len(tokens[i])
            samples.append(Sample(
                token_ids=tokens[i][:end], logprobs=logps[i][:end], temperatures=temps[i][:end],
                finish_reason="stop" if len(hit) else "length",
            ))  # fmt: skip
        return [samples[i : i + n] for i in range(0, len(samples), n)]

    def release_memory(self) -> None:
        """Move the weights to host memory (a no-op move on CPU); ``generate`` then refuses."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._released = True

    def resume_memory(self, parts=MEMORY_PARTS) -> None:
        """The weights back on the device (this engine keeps no cache)."""
        if "weights" in parts:
            self.model.to(self.device)
            self._released = False

    def health(self) -> bool:
        return not self._released

    def _check_usable(self) -> None:
        if self._released:
            raise RuntimeError("the engine's memory is released: call resume_memory() first")
