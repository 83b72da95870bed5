"""The rollout engine a config asks for (built on global rank 0 only, after the actor is loaded,
so colocated servers size their memory around it)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

from megatron_archer.buckets import Bucket
from megatron_archer.models import ModelSpec
from megatron_archer.rollout import LocalEngine, RetryPolicy, RolloutEngine, SGLangEngine
from megatron_archer.rollout.local_engine import cpu_cores
from megatron_archer.rollout.process_engine import ProcessEngine
from megatron_archer.rollout.sglang_engine import CallPolicies
from megatron_archer.trainer.config import ExperimentConfig, SGLangConfig


def call_policies(sg: SGLangConfig) -> CallPolicies:
    """The engine's timeouts and retries from ``rollout.sglang`` (its docstring)."""
    return CallPolicies(
        generate=RetryPolicy(timeout_s=sg.request_timeout_s, attempts=sg.request_attempts),
        control=RetryPolicy(timeout_s=sg.control_timeout_s),
        update=RetryPolicy(timeout_s=sg.update_timeout_s, attempts=1, idempotent=False),
        disk_update=RetryPolicy(timeout_s=sg.disk_update_timeout_s, attempts=1, idempotent=False),
        health=RetryPolicy(timeout_s=sg.health_timeout_s, attempts=1),
    )


class ResponseProgress:
    """``on_progress(done, total)`` as a transient progress bar of responses, one per generation
    (tqdm, like the trainer's other bars: ``logging.progress``); ``bar`` makes one."""

    def __init__(self, bar=None):
        if bar is None:
            from tqdm.auto import tqdm

            def bar(total):
                return tqdm(total=total, leave=False, dynamic_ncols=True, desc="rollout",
                            unit="response")
        self.make_bar, self.bar = bar, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = self.make_bar(total)
        self.bar.update(done - self.bar.n)
        if done == total:
            self.bar.close()
            self.bar = None


def launch_base_gpu(base_gpu_id: int | None, colocated: bool, weight_sync: str,
                    trainer_gpus: int) -> int:
    """The first GPU of this node for launched servers: ``base_gpu_id``, or by default 0 when
    colocated (they share the trainer's GPUs) and the first GPU after the trainer's
    ``trainer_gpus`` otherwise. Under ``weight_sync: distributed`` a server GPU among the
    trainer's would put two ranks of one NCCL group on one GPU, which NCCL refuses."""
    base = base_gpu_id if base_gpu_id is not None else (0 if colocated else trainer_gpus)
    if weight_sync == "distributed" and base < trainer_gpus:
        raise ValueError(f"rollout.sglang.base_gpu_id {base} is a GPU of the trainer (it uses "
                         f"GPUs 0-{trainer_gpus - 1} of this node): weight_sync 'distributed' "
                         f"needs the servers on other GPUs (base_gpu_id >= {trainer_gpus})")
    return base


def build_engine(config: ExperimentConfig,
                 weights_source: Callable[[], Iterable[Bucket]] | None = None) -> RolloutEngine:
    """``local``: transformers on this process's GPU (CPU without one), loading ``model.path``;
    with ``rollout.async`` in a process of its own (``ProcessEngine``; on CPU ``rollout.threads``
    or half the cores, at least one, so that training keeps the rest);
    ``sglang``: launched here or attached to by URL (``rollout.sglang``); with
    ``weight_sync: distributed``, joined to this process by the NCCL weight-update group
    (``master_address``/``master_port``, needs CUDA) before the first weight sync. Servers
    launched here are stopped when that fails; with ``rollout.async`` an update pauses the
    servers in ``retract`` mode (their requests resume on the new weights). ``weights_source``:
    the current weights, for a server restarted mid-rollout (``SGLangEngine``). With
    ``actor.routing_replay: rollout`` every engine returns each sample's routing."""
    rollout, path = config.rollout, config.model.path
    routing = config.actor.routing_replay == "rollout"
    if rollout.engine == "local":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, rollout.dtype)
        threads = rollout.threads
        if rollout.async_:
            threads = threads or (max(1, cpu_cores() // 2) if device == "cpu" else None)
            return ProcessEngine(path, device=device, dtype=dtype, threads=threads,
                                 record_routing=routing)
        return LocalEngine(path, device=device, dtype=dtype, threads=threads,
                           record_routing=routing)
    sg = rollout.sglang
    extra_args, routing_shape = list(sg.extra_args), None
    if routing:  # the model's layers and top-k shape the servers' routing answers
        spec = ModelSpec.from_pretrained(path)
        routing_shape = (spec.num_layers, spec.moe_top_k)
        extra_args.append("--enable-return-routed-experts")
    path = sg.model_path or path  # what the servers serve (a block-FP8 copy for weight_dtype fp8)
    options = dict(routing=routing_shape,
                   weight_sync=sg.weight_sync, bucket_bytes=sg.bucket_bytes, disk_dir=sg.disk_dir,
                   base_model_path=path, weight_dtype=sg.weight_dtype,
                   policies=call_policies(sg), max_inflight=sg.max_inflight,
                   max_restarts=sg.max_restarts, weights_source=weights_source,
                   pause_mode="retract" if rollout.async_ else "abort",
                   on_progress=ResponseProgress() if config.logging.progress else None)
    if sg.launch:
        base_gpu = launch_base_gpu(sg.base_gpu_id, rollout.colocated, sg.weight_sync,
                                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        engine = SGLangEngine.launch(path, num_servers=sg.num_servers, base_port=sg.base_port,
                                     tp_size=sg.tp_size, base_gpu_id=base_gpu,
                                     mem_fraction_static=sg.mem_fraction_static,
                                     extra_args=extra_args,
                                     startup_timeout_s=sg.startup_timeout_s, **options)
    else:
        engine = SGLangEngine(sg.server_urls, router_url=sg.router_url, tp_size=sg.tp_size,
                              **options)
    if sg.weight_sync == "distributed":
        try:
            engine.init_weight_update_group(sg.master_address, sg.master_port)
        except BaseException:
            engine.shutdown()  # the servers launched here; attached ones are left running
            raise
    return engine
