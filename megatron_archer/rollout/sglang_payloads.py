"""JSON bodies of the SGLang HTTP requests the adapter sends, and the parsing of ``/generate``
results. Field names follow ``sglang.srt.managers.io_struct`` (checked by tests/rollout against
the installed SGLang's request types)."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

import torch

from megatron_archer.rollout.engine import Sample, SamplingParams

# SGLang's memory regions (``sglang.srt.constants.GPU_MEMORY_TYPE_*``, 0.5.5 and later)
WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
MEMORY_TAGS = (WEIGHTS, KV_CACHE, CUDA_GRAPH)


def sampling_params_payload(params: SamplingParams, sample_seed: int | None) -> dict[str, Any]:
    """One sample's SGLang ``sampling_params``; ``sample_seed`` is SGLang's ``sampling_seed``
    (used only by servers started with ``--enable-deterministic-inference``)."""
    if params.entropy_aware is not None:
        raise ValueError("entropy_aware: SGLang has no per-token temperature rule; use LocalEngine")
    payload = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop_token_ids": list(params.stop_token_ids),
        "n": 1,
    }
    if sample_seed is not None:
        payload["sampling_seed"] = sample_seed
    return payload


def generate_payload(
    rows: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int | None],
    routing: bool = False,
) -> dict[str, Any]:
    """A batched ``/generate`` body: one row per sample, each with its own seed; ``routing``:
    each answer carries its tokens' experts (``return_routed_experts``, later 0.5.x: SGLang 0.5.5
    lacks it, ``has_routed_experts``)."""
    body = {
        "input_ids": [list(r) for r in rows],
        "sampling_params": [sampling_params_payload(params, s) for s in seeds],
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
    }
    if routing:
        body["return_routed_experts"] = True  # the whole sequence: routed_experts_start_len 0
    return body


def has_routed_experts(version: str | None) -> bool:
    """Whether an SGLang version has ``GenerateReqInput.return_routed_experts`` (0.5.5 does not;
    the later 0.5.x checked here do). An unknown version is given the benefit of the doubt: its
    answer then says (``parse_routing``)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version or "")
    return match is None or tuple(int(x) for x in match.groups()) > (0, 5, 5)


def parse_routing(meta: dict[str, Any], tokens: int, layers: int, top_k: int,
                  url: str) -> torch.Tensor:
    """The experts of a sequence's first ``tokens`` tokens, [tokens, layers, top_k] int16, from
    ``meta_info.routed_experts``: base64 of SGLang's int32 array [tokens, num_hidden_layers,
    top_k] (row t: the t-th token of prompt + response, every token but the last)."""
    encoded = meta.get("routed_experts")
    if encoded is None:
        raise RuntimeError(f"{url}: the /generate answer has no meta_info.routed_experts: start "
                           f"the server with --enable-return-routed-experts")
    flat = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.int32)
    if flat.numel() != tokens * layers * top_k:
        raise RuntimeError(f"{url}: meta_info.routed_experts holds {flat.numel()} experts, "
                           f"expected {tokens} tokens x {layers} layers x top-{top_k}")
    return flat.view(tokens, layers, top_k).to(torch.int16)


def finish_kind(result: dict[str, Any]) -> str | None:
    """Why one element of a ``/generate`` answer ended: "stop", "length", "abort" (an abort
    request, or SGLang 0.5.5's ``/pause_generation``, which aborts every request), or None."""
    reason = result["meta_info"].get("finish_reason") or {}
    return reason.get("type") if isinstance(reason, dict) else reason


def parse_generate_result(result: dict[str, Any], params: SamplingParams, url: str,
                          routing: tuple[int, int, int] | None = None) -> Sample:
    """A ``Sample`` from one element of a ``/generate`` answer (``output_ids``, and
    ``meta_info.output_token_logprobs`` as ``[logprob, token_id, text]`` triples); ``routing``:
    (prompt tokens, layers, top_k) of a request that asked for its routing (``parse_routing``)."""
    meta = result["meta_info"]
    reason = meta.get("finish_reason")
    kind = finish_kind(result)
    if kind not in ("stop", "length"):
        raise RuntimeError(f"{url}: generation ended with finish_reason {reason!r}")
    triples = meta["output_token_logprobs"]
    token_ids = [int(t[1]) for t in triples]
    if list(result.get("output_ids", token_ids)) != token_ids:
        raise RuntimeError(f"{url}: output_ids and output_token_logprobs disagree")
    temperature = 1.0 if params.greedy else params.temperature
    return Sample(
        token_ids=token_ids,
        logprobs=[float(t[0]) for t in triples],
        finish_reason=kind,
        temperatures=[temperature] * len(token_ids),
        weight_version=_first_version(meta.get("weight_versions")),
        routing=None if routing is None else parse_routing(
            meta, routing[0] + len(token_ids) - 1, routing[1], routing[2], url),
    )


def _first_version(spans) -> int | None:
    """The version a request started with: the first of SGLang's ``meta_info.weight_versions``
    spans (``{"version", "start", "end"}`` per run of tokens, later 0.5.x), when it is a version
    this trainer sent (an integer); else None."""
    if not spans:
        return None
    try:
        return int(spans[0]["version"])
    except (KeyError, TypeError, ValueError):
        return None


def update_from_tensor_payload(serialized: Sequence[str], version: int) -> dict[str, Any]:
    """``/update_weights_from_tensor``: one serialised bucket per tensor-parallel rank of the
    server, in rank order (each rank opens its own entry's handles)."""
    return {
        "serialized_named_tensors": list(serialized),
        "flush_cache": False,  # flushed once after the last bucket
        "weight_version": str(version),
    }


def init_group_payload(
    master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str,
    backend: str = "nccl",
) -> dict[str, Any]:
    """``/init_weights_update_group``: the server's ranks join at ``rank_offset`` (trainer = 0);
    ``backend`` nccl (GPUs), or gloo (CPU servers)."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def weight_update_session_payload() -> dict[str, Any]:
    """``/begin_weight_update`` and ``/end_weight_update`` (later 0.5.x, absent in 0.5.5): the
    tensor and distributed updates are refused outside such a session (HTTP 400 "... must run
    between begin_weight_update() and end_weight_update()"). Every runner (``selector`` "all")."""
    return {}


def server_version(info: Any) -> str | None:
    """The SGLang version in a ``/get_server_info`` answer, None when it names none."""
    version = info.get("version") if isinstance(info, dict) else None
    return str(version) if version is not None else None


def update_from_distributed_payload(
    names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str, version: int
) -> dict[str, Any]:
    """``/update_weights_from_distributed``: the tensors rank 0 broadcasts next, in order."""
    return {
        "names": names,
        "dtypes": dtypes,
        "shapes": shapes,
        "group_name": group_name,
        "flush_cache": False,
        "weight_version": str(version),
    }


def update_from_disk_payload(model_path: str, version: int) -> dict[str, Any]:
    """``/update_weights_from_disk``: reload every weight from a checkpoint directory."""
    return {"model_path": model_path, "weight_version": str(version)}


def memory_payload(tags: Sequence[str]) -> dict[str, Any]:
    """``/release_memory_occupation`` and ``/resume_memory_occupation``: the regions named by
    ``tags`` (``MEMORY_TAGS``). SGLang's scheduler raises when asked to resume a region that is
    not released, so the engine tracks what each server has released."""
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown or not tags:
        raise ValueError(f"memory tags {list(tags)} must be a non-empty subset of {MEMORY_TAGS}")
    return {"tags": list(tags)}


PAUSE_MODES = ("abort", "retract")


def pause_payload(mode: str = "abort") -> dict[str, Any]:
    """``/pause_generation``: SGLang 0.5.5 reads no body, later 0.5.x require one
    (``PauseGenerationReqInput``). ``abort`` is 0.5.5's only behaviour (running requests are
    aborted; the engine pauses only between generations, when none run); ``retract`` (later
    0.5.x; asynchronous training) puts the running requests back in the queue, the KV cache may
    be flushed, and they resume on the new weights after ``/continue_generation``."""
    if mode not in PAUSE_MODES:
        raise ValueError(f"pause mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}")
    return {"mode": mode}


def continue_payload() -> dict[str, Any]:
    """``/continue_generation``: no body in 0.5.5; an empty ``ContinueGenerationReqInput`` (its
    defaults) in later 0.5.x."""
    return {}
