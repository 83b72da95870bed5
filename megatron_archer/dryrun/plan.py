"""The whole job, rank by rank, before any GPU is booked: what each rank holds and moves.

Every global rank is built in a fresh fake world (``rank_build``). From what was built, per rank:
parameters, gradients and optimizer state in bytes (megatron's DDP buffers and optimizer shard:
exact), the reference model, the activations, logits and log-prob working set of one
micro-batch at the token budget (``memory``: an estimate from the built shapes), the
weight-sync traffic, the rollout share, the collectives and the largest of them. Everything is
returned as plain data (``report``) for the terminal table and the JSON file.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from pathlib import Path

import torch

from megatron_archer.buckets import bounded_buckets
from megatron_archer.dryrun import memory
from megatron_archer.dryrun.rank_build import BuildInputs, RankBuild, build_rank
from megatron_archer.models import ModelSpec, hf_weight_buckets
from megatron_archer.models.weight_map import Layout, weight_mappings
from megatron_archer.rollout.fp8_weights import BLOCK, is_quantized
from megatron_archer.trainer.config import ExperimentConfig
from megatron_archer.trainer.rollout_share import SIZES
from megatron_archer.trainer.step import needs_reference

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, name: str = "--gpu-memory") -> int:
    """``80GiB``, ``80GB`` (10^9), ``81920MiB`` ... -> bytes; a bad value names ``name``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} {text!r}: expected a number and a unit, e.g. 80GiB or 80GB "
                         f"(units {', '.join(sorted(_UNITS, key=_UNITS.get))})")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def model_spec(path: str | Path, field: str = "--model-config") -> ModelSpec:
    """The ModelSpec of a Hugging Face model directory (its config.json) or of a config.json
    file, as the job reads it (``ModelSpec.from_pretrained``)."""
    path = Path(path)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"{field} {path}: expected a model directory or its config.json")
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field} {path} has no config.json: pass a Hugging Face model "
                                f"directory (examples/scale/model_configs/ has published ones)")
    return ModelSpec.from_pretrained(path)


def world_size_of(config: ExperimentConfig, world_size: int | None = None,
                  nodes: int | None = None, gpus_per_node: int = 8) -> int:
    """The job's world size: given, nodes x GPUs per node, or implied by ``parallel.data``."""
    parallel = config.parallel
    if world_size is None and nodes is not None:
        world_size = nodes * gpus_per_node
    if world_size is None:
        if parallel.data is None:
            raise ValueError("the world size is not implied: parallel.data is not set; pass "
                             "--nodes N (with --gpus-per-node, default 8) or --world-size N")
        world_size = parallel.tensor * parallel.pipeline * parallel.context * parallel.data
    if world_size < 1:
        raise ValueError(f"the world size must be >= 1; got {world_size}")
    parallel.data_size(world_size)  # the job's check, naming the fields
    return world_size


def build_inputs(config: ExperimentConfig, spec: ModelSpec, world_size: int) -> BuildInputs:
    """What ``trainer.loop.Trainer._build`` passes to the model builder, for every rank."""
    return BuildInputs(
        spec=spec, parallel=config.parallel, world_size=world_size,
        params_dtype=config.actor.torch_params_dtype,
        overrides={**config.model.megatron_overrides(), **config.parallel.megatron_overrides()},
        te=config.model.backend == "te", reference=needs_reference(config.algorithm))


def share_bytes(mini_batches: int, sequences: int, prompt_tokens: int, response_tokens: int,
                routing: tuple[int, int] | None = None) -> int:
    """Bytes of one data-parallel rank's rollout share as ``trainer.rollout_share.pack_share``
    packs it: ``mini_batches`` mini-batches of ``sequences`` sequences, each of
    ``prompt_tokens + response_tokens`` tokens (int32 counts, lengths and token ids; float32
    advantages and rollout log-probs); with ``routing`` = (layers, top_k) the engine's routing
    of each sequence's first ``prompt_tokens + response_tokens - 1`` tokens (int16 experts)."""
    ints = 1 + mini_batches * (1 + sequences * (2 + prompt_tokens + response_tokens))
    floats = mini_batches * sequences * (1 + response_tokens)
    if routing is not None:
        total = mini_batches * sequences
        experts = total * (prompt_tokens + response_tokens - 1) * routing[0] * routing[1]
        ints += 2 + total + math.ceil(experts / 2)
    return 4 * (ints + floats)


def sync_tensors(spec: ModelSpec, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of a weight sync, in ``models.hf_weight_buckets``' order, on
    the meta device."""
    return [(name, torch.empty(shape, dtype=dtype, device="meta"))
            for mapping in weight_mappings(spec, "local")
            for name, shape in zip(mapping.hf_names, mapping.hf_shapes)]


def sync_bucket_bytes(tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[int]:
    """Bytes of each bucket ``models.hf_weight_buckets`` yields (``buckets.bounded_buckets``) of
    ``sync_tensors``."""
    return [sum(t.numel() * t.element_size() for _, t in bucket)
            for bucket in bounded_buckets(tensors, bucket_bytes)]


def fp8_bytes(name: str, tensor: torch.Tensor) -> int:
    """Bytes a tensor travels as with ``sglang.weight_dtype: fp8`` (``rollout.fp8_weights``:
    quantised weights as e4m3 plus a float32 scale per 128 x 128 block)."""
    if not is_quantized(name, tensor):
        return tensor.numel() * tensor.element_size()
    rows, cols = tensor.shape
    return tensor.numel() + 4 * math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK)


def weight_sync_plan(config: ExperimentConfig, spec: ModelSpec, builds: list[RankBuild]) -> dict:
    """The buckets of a weight sync and what each rank gathers (module docstring of
    ``models.hf_export``: each parameter all-gathered over its stage's tensor-parallel group, an
    expert's over the expert-tensor-parallel group, an expert broadcast from the expert-parallel
    rank that holds it to the others of its stage, then everything broadcast from its stage over
    the pipeline group)."""
    rollout = config.rollout
    sg = rollout.sglang if rollout.engine == "sglang" else None
    # the trainer passes sglang.bucket_bytes, or leaves hf_weight_buckets' default
    default = inspect.signature(hf_weight_buckets).parameters["bucket_bytes"].default
    bucket_bytes = sg.bucket_bytes if sg is not None else default
    dtype = config.actor.torch_params_dtype
    tensors = sync_tensors(spec, dtype)
    buckets = sync_bucket_bytes(tensors, bucket_bytes)
    fp8 = sg is not None and sg.weight_dtype == "fp8"
    sent = sum(fp8_bytes(n, t) if fp8 else t.numel() * t.element_size() for n, t in tensors)
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    etp = config.parallel.expert_tensor_size
    owner: dict[str, int] = {}
    for build in sorted(builds, key=lambda b: b.pipeline):
        for name in build.parameters:
            owner.setdefault(name, build.pipeline)
    mappings = weight_mappings(spec, "local")
    per_rank = {}
    for build in builds:
        gathers = []
        received = from_experts = 0
        for mapping in mappings:
            full = sum(math.prod(s) for s in mapping.hf_shapes) * dtype.itemsize
            split = etp if mapping.expert is not None else tp
            if mapping.megatron_name in build.parameters:
                if mapping.layout is not Layout.REPLICATED and split > 1:
                    gathers.append(build.parameters[mapping.megatron_name] * split * dtype.itemsize)
            elif mapping.expert is not None and owner[mapping.megatron_name] == build.pipeline:
                from_experts += full  # held by another expert-parallel rank of this stage
            elif pp > 1 and owner.get(mapping.megatron_name) is not None:
                received += full
        per_rank[build.rank] = {"tp_all_gather_bytes": sum(gathers),
                                "largest_tp_all_gather_bytes": max(gathers, default=0),
                                "pp_broadcast_received_bytes": received,
                                "ep_broadcast_received_bytes": from_experts}
    return {"bucket_bytes_limit": bucket_bytes, "buckets": buckets, "num_buckets": len(buckets),
            "largest_bucket_bytes": max(buckets), "total_bytes": sum(buckets),
            "weight_dtype": sg.weight_dtype if sg is not None else "as trained",
            "sent_bytes": sent, "largest_tensor_bytes": max(
                t.numel() * t.element_size() for _, t in tensors),
            "per_rank": per_rank}


def memory_layout(config: ExperimentConfig, world_size: int) -> memory.Layout:
    """The memory model's layout of ``config`` at ``world_size``."""
    parallel, actor = config.parallel, config.actor
    return memory.Layout(tp=parallel.tensor, pp=parallel.pipeline,
                         dp=parallel.data_size(world_size), cp=parallel.context,
                         sp=parallel.sequence_parallel, tokens=actor.max_tokens_per_micro_batch,
                         recompute=config.model.recompute == "full",
                         chunk=actor.logprob_chunk_size,
                         param_bytes=actor.torch_params_dtype.itemsize,
                         fused_logprobs=actor.logprob_impl == "fused", ep=parallel.expert,
                         etp=parallel.expert_tensor_size)


def _rank_memory(config: ExperimentConfig, arch: memory.Arch, layout: memory.Layout,
                 build: RankBuild) -> dict[str, float]:
    """The memory terms (``memory`` module docstring) of one built rank, in bytes."""
    actor, pp, cp = config.actor, layout.pp, layout.cp
    dtype = config.actor.torch_params_dtype
    logits = working = 0.0
    if build.vocab_rows:
        logits, working = memory.logit_bytes(actor.max_tokens_per_micro_batch / cp,
                                             build.vocab_rows, actor.logprob_chunk_size,
                                             actor.logprob_impl == "fused")
    terms = {
        "weights": float(sum(b.param_bytes for b in build.buffers)),
        "grads": float(sum(b.grad_bytes for b in build.buffers)),
        "optimizer": float(memory.optimizer_bytes(dtype.itemsize)
                           * sum(b.shard for b in build.buffers)),
        # colocated runs offload the reference between uses (trainer.step)
        "reference": 0.0 if config.rollout.colocated
        else float(build.reference_parameters * dtype.itemsize),
        "activations": memory.activation_bytes(arch, layout, build.layers, pp - build.pipeline),
        "logits": logits,
        "logprob_work": working,
    }
    terms["total"] = sum(terms.values())
    return terms


def _collectives(config: ExperimentConfig, spec: ModelSpec, build: RankBuild, sync: dict,
                 share: int, layout: memory.Layout) -> list[dict]:
    """The collectives this rank takes part in with their largest message, in bytes (an
    all-to-all: what this rank sends, with balanced routing)."""
    parallel = config.parallel
    tp, pp, cp = parallel.tensor, parallel.pipeline, parallel.context
    etp, ep = parallel.expert_tensor_size, parallel.expert
    groups = {False: ("data x context", layout.dp * cp), True: ("expert data", layout.expert_data)}
    tokens = config.actor.max_tokens_per_micro_batch / cp
    hidden = tokens * spec.hidden_size * config.actor.torch_params_dtype.itemsize
    out = [{"name": "rollout share scatter (received)", "group": "world", "bytes": share}]
    for buffer in build.buffers:
        group, size = groups[buffer.expert]
        if size > 1:
            largest = max(buffer.buckets)
            out += [{"name": "gradient reduce-scatter", "group": group,
                     "bytes": largest * buffer.grad_dtype.itemsize},
                    {"name": "parameter all-gather", "group": group,
                     "bytes": largest * buffer.param_dtype.itemsize}]
    if spec.is_moe and ep * etp > 1:
        # each of this rank's tokens (1/tp of them under sequence parallelism) goes to top_k experts
        routed = int(hidden / (tp if parallel.sequence_parallel else 1) * spec.moe_top_k)
        if ep > 1:
            out.append({"name": "expert all-to-all", "group": "expert", "bytes": routed})
        if etp > 1:
            out.append({"name": "expert-tensor all-gather", "group": "expert tensor",
                        "bytes": routed * etp})
    if tp > 1:
        name = "sequence-parallel all-gather" if parallel.sequence_parallel else "activation all-reduce"
        out.append({"name": name, "group": "tensor", "bytes": int(hidden)})
        out.append({"name": "weight-sync all-gather", "group": "tensor",
                    "bytes": sync["per_rank"][build.rank]["largest_tp_all_gather_bytes"]})
    if pp > 1:
        split = tp if parallel.sequence_parallel else 1
        out.append({"name": "pipeline send/recv", "group": "pipeline", "bytes": int(hidden / split)})
        out.append({"name": "weight-sync broadcast", "group": "pipeline",
                    "bytes": sync["largest_tensor_bytes"]})
    return out


def plan(config: ExperimentConfig, spec: ModelSpec, world_size: int,
         gpu_memory: int | None = None) -> dict:
    """Build every rank of ``config`` at ``world_size`` and report it (module docstring)."""
    started = time.perf_counter()
    arch = memory.Arch.from_spec(spec)
    inputs = build_inputs(config, spec, world_size)
    builds = []
    for rank in range(world_size):
        try:
            builds.append(build_rank(inputs, rank))
        except Exception as error:  # noqa: BLE001 - the job's construction error, any type
            kind = "" if isinstance(error, ValueError) else f"{type(error).__name__}: "
            raise ValueError(f"rank {rank} of {world_size}: {kind}{error}") from error
    layout = memory_layout(config, world_size)
    memory.check_layout(arch, layout)  # what the actor refuses after the build
    parallel = config.parallel
    dp = parallel.data_size(world_size)
    sequences = math.ceil(config.train.mini_batch_size * config.rollout.n / dp)
    routing = ((spec.num_layers, spec.moe_top_k)  # every layer: a dense layer's rows are 0
               if spec.is_moe and config.actor.routing_replay == "rollout" else None)
    share = SIZES * 8 + share_bytes(config.rollout.prompts_per_step // config.train.mini_batch_size,
                                    sequences, config.data.max_prompt_length,
                                    config.rollout.max_new_tokens, routing)
    sync = weight_sync_plan(config, spec, builds)
    ranks = []
    for build in builds:
        terms = _rank_memory(config, arch, layout, build)
        collectives = _collectives(config, spec, build, sync, share, layout)
        ranks.append({
            "rank": build.rank, "pipeline": build.pipeline, "tensor": build.tensor,
            "context": build.context, "data": build.data,
            "layers": [build.layers[0], build.layers[-1]] if build.layers else [],
            "parameters": sum(build.parameters.values()),
            "buffer_padding": sum(b.numel - b.numel_unpadded for b in build.buffers),
            "grad_buckets": [n for b in build.buffers for n in b.buckets],
            "optimizer_shard": sum(b.shard for b in build.buffers),
            "reference_parameters": build.reference_parameters,
            "bytes": terms,
            "fits": None if gpu_memory is None else terms["total"] <= gpu_memory,
            "weight_sync": sync["per_rank"][build.rank],
            "collectives": collectives,
            "largest_collective": max(collectives, key=lambda c: c["bytes"]),
        })
    del sync["per_rank"]
    return {
        "world_size": world_size,
        "layout": {"tensor": parallel.tensor, "pipeline": parallel.pipeline,
                   "context": parallel.context, "data": dp,
                   "sequence_parallel": parallel.sequence_parallel,
                   "expert": parallel.expert, "expert_tensor": parallel.expert_tensor_size,
                   "expert_data": layout.expert_data},
        "model": {"architecture": spec.architecture, "layers": spec.num_layers,
                  "hidden": spec.hidden_size, "vocab": spec.vocab_size,
                  "parameters": arch.parameters(), "active_parameters": arch.parameters(True),
                  "experts": spec.num_experts, "top_k": spec.moe_top_k},
        "backend": config.model.backend,
        "layer_spec_built": "local (portable; Transformer Engine's parameters have the same shapes)",
        "reference": {"built": inputs.reference,
                      "resident": inputs.reference and not config.rollout.colocated},
        "tokens_per_micro_batch": config.actor.max_tokens_per_micro_batch,
        "longest_sequence": config.data.max_prompt_length + config.rollout.max_new_tokens,
        "recompute": config.model.recompute,
        "gpu_memory": gpu_memory,
        "params_bytes_per_element": config.actor.torch_params_dtype.itemsize,
        "estimated": ["activations", "logits", "logprob_work"],
        "rollout_share_bytes_per_rank": share,
        "weight_sync": sync,
        "ranks": ranks,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _gib(value: float) -> str:
    return f"{value / memory.GIB:.2f}"


def format_table(report: dict) -> str:
    """The per-rank table and the job's lines, for the terminal."""
    head = ["rank", "pp", "tp", "cp", "dp", "layers", "params", "weights", "grads", "optim",
            "ref", "activ*", "logits*", "lp work*", "total GiB", "largest collective"]
    if report["gpu_memory"] is not None:
        head.append("fits")
    rows = []
    for r in report["ranks"]:
        b, big = r["bytes"], r["largest_collective"]
        layers = f"{r['layers'][0]}-{r['layers'][1]}" if r["layers"] else "-"
        row = [str(r["rank"]), str(r["pipeline"]), str(r["tensor"]), str(r["context"]),
               str(r["data"]), layers, f"{r['parameters'] / 1e9:.3f}B",
               *(_gib(b[k]) for k in ("weights", "grads", "optimizer", "reference",
                                      "activations", "logits", "logprob_work", "total")),
               f"{big['name']} {_gib(big['bytes'])} GiB"]
        if report["gpu_memory"] is not None:
            row.append("yes" if r["fits"] else "NO")
        rows.append(row)
    widths = [max(len(x) for x in column) for column in zip(head, *rows)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *rows]]
    layout, model = report["layout"], report["model"]
    experts = ""
    if model["experts"]:
        experts = (f"; {model['experts']} experts, top-{model['top_k']}, over expert "
                   f"{layout['expert']} x expert-tensor {layout['expert_tensor']} x pipeline "
                   f"{layout['pipeline']} x expert data {layout['expert_data']}")
    lines += [
        "",
        f"{report['world_size']} ranks (tensor {layout['tensor']} x pipeline {layout['pipeline']}"
        f" x context {layout['context']} x data {layout['data']}{experts}), each built on the meta "
        f"device in a fake world, in {report['seconds']} s; layer spec built: "
        f"{report['layer_spec_built']}",
        "* estimated (docs/scaling.md: the memory model) for a micro-batch of "
        f"{report['tokens_per_micro_batch']} tokens (longest sequence "
        f"{report['longest_sequence']}), recompute {report['recompute']}; the other columns are "
        "the built parameters, megatron's DDP buffers and the distributed optimizer's shard",
        _summary(report),
    ]
    if report["gpu_memory"] is not None:
        over = [r["rank"] for r in report["ranks"] if not r["fits"]]
        lines.append(f"GPU memory {_gib(report['gpu_memory'])} GiB: "
                     + (f"ranks {over} do not fit" if over else "every rank fits"))
    return "\n".join(lines)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def format_markdown(report: dict) -> str:
    """The table as markdown, ranks with equal figures on one row (docs/scaling.md)."""
    keys = ("weights", "grads", "optimizer", "reference", "activations", "logits",
            "logprob_work", "total")
    rows: dict[tuple, list[int]] = {}
    for r in report["ranks"]:
        big = r["largest_collective"]
        layers = f"{r['layers'][0]}-{r['layers'][1]}" if r["layers"] else "-"
        row = (str(r["pipeline"]), layers, f"{r['parameters'] / 1e9:.3f}B",
               *(_gib(r["bytes"][k]) for k in keys),
               f"{big['name']} ({big['group']}) {_gib(big['bytes'])}")
        rows.setdefault(row, []).append(r["rank"])
    head = ("| ranks | stage | layers | params | weights | grads | optimizer | reference | "
            "activations* | logits* | log-prob work* | total GiB | largest collective (GiB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [f"| {_ranges(ranks)} | " + " | ".join(row) + " |" for row, ranks in rows.items()]
    return "\n".join([*lines, "", _summary(report)])


def _summary(report: dict) -> str:
    """The weight sync, the reference model and the rollout share, in one paragraph."""
    sync, reference = report["weight_sync"], report["reference"]
    largest = sync["largest_bucket_bytes"]
    alone = " (larger tensors travel alone)" if largest > sync["bucket_bytes_limit"] else ""
    text = (f"Weight sync: {sync['num_buckets']} buckets of at most "
            f"{sync['bucket_bytes_limit'] >> 20} MiB{alone}, the largest {largest >> 20} MiB, "
            f"{_gib(sync['total_bytes'])} GiB in all, sent as {sync['weight_dtype']} "
            f"({_gib(sync['sent_bytes'])} GiB) by global rank 0")
    gathered, received, from_experts = (
        max(r["weight_sync"][key] for r in report["ranks"])
        for key in ("tp_all_gather_bytes", "pp_broadcast_received_bytes",
                    "ep_broadcast_received_bytes"))
    if gathered or received:
        text += (f"; every rank all-gathers up to {_gib(gathered)} GiB over tensor parallel and "
                 f"receives up to {_gib(received)} GiB by pipeline broadcast")
    if from_experts:
        text += (" and " if gathered or received else "; every rank receives up to ") + (
            f"{_gib(from_experts)} GiB of other ranks' experts by expert-parallel broadcast")
    text += ". "
    if reference["built"]:
        size = _gib(max(r["reference_parameters"] for r in report["ranks"])
                    * report["params_bytes_per_element"])
        text += (f"Reference model: {size} GiB a rank, "
                 + ("resident. " if reference["resident"]
                    else "offloaded to CPU memory between uses (colocated rollout). "))
    return text + (f"Rollout share: {report['rollout_share_bytes_per_rank'] / (1 << 20):.1f} MiB "
                   f"received by every rank a step at the longest responses.")


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=1, default=str) + "\n")
